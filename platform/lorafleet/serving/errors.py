"""OpenAI-shaped errors and API-key auth: the one place a serving error gets its status and body.

Every error a client sees is ``{"error": {"message", "type", "code", "param"?, "available"?,
"fields"?}}`` (OpenAI's error object, plus the valid options where there are any; vLLM's
``ErrorResponse``): our :class:`ServingError`, an engine replica that died mid-request (Ray's
``RayActorError``: 503), FastAPI's request validation (422 with every field
error, where Ray's handler answers 400 with the first one only), Ray Serve LLM's
``OpenAIHTTPException``, Starlette's ``HTTPException`` (unknown routes: 404 listing the routes,
wrong methods: 405 with ``Allow``), vLLM's request validation (``VLLMClientError``, raised while
FastAPI builds vLLM's request models: 400, as vLLM's server words it), any other exception raised
while a request body is validated (:func:`client_body`: 400 naming the field) and a pydantic
``ValidationError`` raised inside a route (422). What escapes all of them is
:mod:`lorafleet.serving.limits`'s last resort (500, traceback logged). User input echoed in a
message is clipped (:func:`clip`). Auth is a bearer-key middleware in front of every route but
``/healthz``.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError, WrapValidator
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from lorafleet.registry import ArtifactNotFoundError, RegistryError

__all__ = [
    "ErrorBody",
    "ErrorResponse",
    "ServingError",
    "clip",
    "client_body",
    "OPEN_PATHS",
    "OPENAPI_ERRORS",
    "error_response",
    "install_error_handlers",
    "install_auth",
    "registry_errors_as_409",
]

OPEN_PATHS = ("/healthz",)  # answered without an API key (load balancers' probes)
ECHO_CHARS = 100  # user input quoted in an error message is cut to this many characters
MESSAGE_CHARS = 2000  # and a whole message (an engine's, say) to this many
MAX_FIELDS = 20  # field errors listed in a 422
ENGINE_RETRY_AFTER_S = 5  # a 503 for a dead engine replica: Serve restarts one in tens of seconds
T = TypeVar("T")
log = logging.getLogger("lorafleet.serving")


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr``-like text of user input for an error message, cut to ``limit`` characters: a client
    must not be able to make the server echo a megabyte (or a terminal escape) back."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot be encoded
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return text[:limit] + "..." if len(text) > limit else text


class ErrorBody(BaseModel):
    """OpenAI's error object, plus the valid options where there are any."""

    message: str
    type: str
    code: int
    param: str | None = None
    available: list[str] | None = None
    fields: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ServingError(Exception):
    """An error with an HTTP status; the app renders it as an OpenAI-shaped :class:`ErrorResponse`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, available: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, code=status, param=param, available=available)


# The error answers of the task routes, for their OpenAPI schema.
OPENAPI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "a body that cannot be parsed", 401: "missing or invalid API key",
        404: "unknown adapter or collection (lists the available ones)",
        409: "adapter files do not match their registered sha256, or the registry cannot be read for it",
        413: "body over max_body_bytes, text over max_text_chars or over the token limit",
        422: "invalid request (field errors), or an adapter the engine cannot load",
        429: "too many requests in flight on this replica (Retry-After)", 500: "internal error (logged)",
        503: "the engine replica serving the request stopped before it answered (Retry-After)",
        504: "no answer within request_timeout_s",
    }.items()
}


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(body.message) > MESSAGE_CHARS:
        body = body.model_copy(update={"message": clip(body.message, MESSAGE_CHARS)})
    return JSONResponse(ErrorResponse(error=body).model_dump(exclude_none=True), status_code=status, headers=headers)


def field_errors(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """pydantic errors -> (one-line summary, ``fields``), locations and count clipped (a location
    can be a key the client sent), the input itself never echoed."""
    fields = [{"loc": [x if isinstance(x, int) else clip(x) for x in e.get("loc", ())],
               "msg": clip(e.get("msg", ""), 300), "type": e.get("type", "")} for e in errors[:MAX_FIELDS]]
    where = "; ".join(f"{'.'.join(str(x) for x in f['loc'])}: {f['msg']}" for f in fields)
    more = f" (+{len(errors) - MAX_FIELDS} more)" if len(errors) > MAX_FIELDS else ""
    return f"invalid request: {where}{more}", fields


def client_body(model: type[BaseModel]) -> Any:
    """``model`` as a route's request body whose validation can fail only as the client's error.

    pydantic turns a ``ValueError`` or ``AssertionError`` raised by a validator into a validation
    error (a 422 here), and lets anything else through: vLLM's chat request model iterates
    ``messages`` in a "before" validator, so ``"messages": null`` raised ``TypeError`` out of FastAPI's
    body parsing and reached the last-resort 500. Through this, any exception raised while the body
    is validated (but a validation error, vLLM's own 400s and ours) is a 400 whose ``param`` and
    message name the field the model's own field types refuse, as vLLM's request errors do.

    Use it as the body parameter's annotation: ``body: client_body(ChatCompletionRequest)``, at
    module level, since FastAPI resolves the annotation by name.
    """
    return Annotated[model, WrapValidator(functools.partial(_validate_body, model))]


def _validate_body(model: type[BaseModel], value: Any, handler: Callable[[Any], Any]) -> Any:
    try:
        return handler(value)
    except (ValidationError, ServingError):
        raise
    except Exception as exc:
        from vllm.exceptions import VLLMClientError

        if isinstance(exc, VLLMClientError):  # vLLM's request errors: a 400 already (install_error_handlers)
            raise
        field, why = refused_field(model, value)
        log.info("request body refused (%s): %s raised %s: %s", model.__name__, field or "no single field",
                 type(exc).__name__, clip(str(exc), 300))
        where = f"{clip(field)!r}: {why}" if field else \
            f"the body could not be validated ({type(exc).__name__}: {clip(str(exc), 200)})"
        raise ServingError(400, f"invalid request: {where}", param=field) from None


def refused_field(model: type[BaseModel], value: Any) -> tuple[str | None, str]:
    """The first top-level field of ``value`` (a request body) whose value ``model``'s own type for
    that field refuses, and pydantic's reason; (None, "") when each field alone is fine."""
    if not isinstance(value, dict):
        return None, ""
    for name, info in model.model_fields.items():
        key = next((k for k in (info.alias, name) if k is not None and k in value), None)
        if key is None:
            continue
        try:
            _field_type(model, name).validate_python(value[key])
        except ValidationError as err:
            return key, clip(err.errors()[0].get("msg", "invalid value"), 300)
        except Exception as exc:  # the field's own validators raised too
            return key, f"invalid value ({type(exc).__name__})"
    return None, ""


@functools.lru_cache(maxsize=512)
def _field_type(model: type[BaseModel], name: str) -> TypeAdapter:
    """A validator of one field of ``model`` alone (built once: the error path only)."""
    info = model.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


async def registry_errors_as_409(awaitable: Awaitable[T]) -> T:
    """Engine-side failures the client can act on get their status instead of a 500."""
    try:
        return await awaitable
    except ArtifactNotFoundError as exc:  # the version was removed after the ingress resolved it
        raise ServingError(404, str(getattr(exc, "cause", exc)), type="not_found_error", param="adapter") from None
    except RegistryError as exc:  # raised in the replica (e.g. sha256 mismatch), re-raised here
        cause = getattr(exc, "cause", exc)
        raise ServingError(409, str(cause), type="adapter_integrity_error") from None


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the routes raise as an :class:`ErrorResponse` with its status."""
    from vllm.exceptions import VLLMClientError

    from ray.exceptions import RayActorError

    from lorafleet.serving._ray_llm import OpenAIHTTPException

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)  # a model built inside a route (not FastAPI's body parsing)
    async def _validation(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        message, fields = field_errors(list(exc.errors()))
        return error_response(422, ErrorBody(message=message, type="invalid_request_error", code=422,
                                             fields=fields))

    @app.exception_handler(VLLMClientError)
    async def _vllm(request: Request, exc: VLLMClientError) -> JSONResponse:
        # vLLM's request models validate in "before" validators that raise this (not a ValueError),
        # so FastAPI's body parsing lets it through: an empty prompt, stream_options without stream,
        # cache_salt "", more than 1024 prompts, top_logprobs without logprobs, ...
        param = getattr(exc, "parameter", None)
        message = exc.args[0] if exc.args else type(exc).__name__
        return error_response(400, ErrorBody(message=clip(str(message), 500), type="invalid_request_error",
                                             code=400, param=param))

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc.status, exc.body)

    @app.exception_handler(RegistryError)
    async def _registry(request: Request, exc: RegistryError) -> JSONResponse:
        # The registry's state (a corrupt aliases.json, say) stops this request; the message says the fix.
        body = ErrorBody(message=clip(str(exc), 500), type="registry_error", code=409)
        return error_response(409, body)

    @app.exception_handler(RayActorError)
    async def _engine_gone(request: Request, exc: RayActorError) -> JSONResponse:
        # The engine replica died (or stopped answering) with this request on it. Nothing is wrong with
        # the request and Ray Serve replaces the replica: 503 and Retry-After, not a 500.
        body = ErrorBody(message="the engine replica serving this request stopped before it answered; "
                                 "Ray Serve is replacing it: retry", type="engine_unavailable_error", code=503)
        return error_response(503, body, headers={"Retry-After": str(ENGINE_RETRY_AFTER_S)})

    @app.exception_handler(OpenAIHTTPException)
    async def _openai(request: Request, exc: OpenAIHTTPException) -> JSONResponse:
        body = ErrorBody(message=exc.message, type=exc.type or "invalid_request_error", code=exc.status_code)
        return error_response(exc.status_code, body)

    @app.exception_handler(HTTPException)  # Starlette's: FastAPI's subclass and the router's 404/405
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        status, headers = exc.status_code, dict(exc.headers or {})
        message, available = str(exc.detail), None
        if status == 404 and exc.detail == "Not Found":  # the router's: no such route
            available = _routes(app)
            message = f"no route {clip(request.url.path)}; routes: {', '.join(available)}"
        elif status == 405:
            message = f"method {clip(request.method, 20)} not allowed on {clip(request.url.path)}; " \
                      f"allowed: {_allowed(headers)}"
        body = ErrorBody(message=message, type="not_found_error" if status == 404 else "invalid_request_error",
                         code=status, available=available)
        return error_response(status, body, headers=headers or None)


def _allowed(headers: dict[str, str]) -> str:
    return next((v for k, v in headers.items() if k.lower() == "allow"), "?")


def _routes(app: FastAPI) -> list[str]:
    """The app's paths, for a 404's ``available``."""
    return sorted({getattr(r, "path", "") for r in app.routes if getattr(r, "path", "")})


def install_auth(app: FastAPI, api_keys: list[str]) -> None:
    """Require ``Authorization: Bearer <key>`` on every path but :data:`OPEN_PATHS` (none if no keys)."""
    keys = [k.encode() for k in api_keys]
    if not keys:
        return

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            # compare_digest against every key: no early exit that leaks which prefix matched.
            ok = scheme.lower() == "bearer" and any(
                [hmac.compare_digest(token.strip().encode(), k) for k in keys]
            )
            if not ok:
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not header
                       else "invalid API key")
                return error_response(401, ErrorBody(message=msg, type="authentication_error", code=401),
                                      headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

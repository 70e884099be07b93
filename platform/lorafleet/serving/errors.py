"""OpenAI-shaped errors and API-key auth: the one place a serving error gets its status and body.

Every error a client sees is ``{"error": {"message", "type", "code", "param"?, "available"?,
"fields"?}}`` (OpenAI's error object, plus the valid options where there are any; vLLM's
``ErrorResponse``): our :class:`ServingError`, FastAPI's request validation (422 with every field
error, where Ray's handler answers 400 with the first one only), Ray Serve LLM's
``OpenAIHTTPException`` and Starlette's ``HTTPException``. Auth is a bearer-key middleware in
front of every route but ``/healthz``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from pydantic import BaseModel
from starlette.responses import JSONResponse

from lorafleet.registry import RegistryError

__all__ = [
    "ErrorBody",
    "ErrorResponse",
    "ServingError",
    "OPEN_PATHS",
    "OPENAPI_ERRORS",
    "error_response",
    "install_error_handlers",
    "install_auth",
    "registry_errors_as_409",
]

OPEN_PATHS = ("/healthz",)  # answered without an API key (load balancers' probes)
T = TypeVar("T")


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
        401: "missing or invalid API key", 404: "unknown adapter (lists the available ones)",
        409: "adapter files do not match their registered sha256", 413: "text over the token limit",
        422: "invalid request (field errors)",
    }.items()
}


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(exclude_none=True), status_code=status, headers=headers)


async def registry_errors_as_409(awaitable: Awaitable[T]) -> T:
    """Engine-side failures the client can act on get their status instead of a 500."""
    try:
        return await awaitable
    except RegistryError as exc:  # raised in the replica (e.g. sha256 mismatch), re-raised here
        cause = getattr(exc, "cause", exc)
        raise ServingError(409, str(cause), type="adapter_integrity_error") from None


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the routes raise as an :class:`ErrorResponse` with its status."""
    from lorafleet.serving._ray_llm import OpenAIHTTPException

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        where = "; ".join(f"{'.'.join(str(x) for x in f['loc'])}: {f['msg']}" for f in fields)
        return error_response(422, ErrorBody(message=f"invalid request: {where}", type="invalid_request_error",
                                             code=422, fields=fields))

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc.status, exc.body)

    @app.exception_handler(OpenAIHTTPException)
    async def _openai(request: Request, exc: OpenAIHTTPException) -> JSONResponse:
        body = ErrorBody(message=exc.message, type=exc.type or "invalid_request_error", code=exc.status_code)
        return error_response(exc.status_code, body)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        body = ErrorBody(message=str(exc.detail), type="invalid_request_error", code=exc.status_code)
        return error_response(exc.status_code, body)


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

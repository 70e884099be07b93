"""What one request may cost a replica, checked before it costs it; and the last-resort 500.

:class:`RequestGuard` is the outermost ASGI middleware of the serving app (inside Starlette's own
error middleware, outside auth and routing):

* **last resort**: an exception nothing else mapped is logged with its traceback and answered
  ``500`` in the documented JSON error shape (never Starlette's plain-text page);
* **body limit**: ``Content-Length`` over ``limits.max_body_bytes`` is a 413 before a byte is read;
  a body without one (chunked) is read up to the limit and refused as soon as it passes it, so
  nothing is parsed and no replica buffers more than the limit;
* **admission**: at most ``limits.max_in_flight`` requests under ``/v1/`` at once per replica; one
  more is a 429 with ``Retry-After`` at once, not a place in an unbounded queue;
* **timeout**: a ``/v1/`` request over ``limits.request_timeout_s`` is cancelled (its generation with
  it) and answered 504 when no answer had started;
* **a stream cut short** (the timeout, an engine replica that died, any error after the first chunk)
  ends with an SSE error event in the same JSON shape, then ``data: [DONE]``, as vLLM's own server
  ends a stream that fails: the client reads why, instead of a stream that merely stops;
* **disconnect**: a client that goes away before its answer is complete has its request cancelled
  (vLLM aborts a cancelled generation), streamed or not: Starlette itself only stops streams.

:func:`check_openai_request` is the OpenAI routes' caps (``n``, prompts, ``stop``, ``logit_bias``,
``logprobs``, text length) and their refusal of lone surrogates, before vLLM tokenizes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lorafleet.config.serve import LimitSettings
from lorafleet.serving.errors import ErrorBody, ErrorResponse, ServingError, clip, error_response

__all__ = ["RequestGuard", "check_openai_request", "check_text", "has_lone_surrogate"]

log = logging.getLogger("lorafleet.serving")
ADMITTED_PREFIX = "/v1/"  # /healthz, /metrics and the docs are never queued or refused


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware (a ``BaseHTTPMiddleware`` would buffer streams and hide exceptions).

    The in-flight count is the process's (a replica is one process), not the instance's: the bound
    is per replica, and under Ray Serve the app's middleware stack is apparently not always one
    object (an instance count read through /metrics once said 0 while three streams ran)."""

    _in_flight = 0  # admitted /v1/ requests of this process; one event loop, so no lock

    def __init__(self, app: Any, limits: LimitSettings) -> None:
        self.app = app
        self.limits = limits

    @property
    def in_flight(self) -> int:
        return RequestGuard._in_flight

    @staticmethod
    def admitted_now() -> int:
        """The /v1/ requests admitted and not yet answered in this process (``/metrics``)."""
        return RequestGuard._in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = streaming = False
        held_end: list[dict] = []  # a stream's closing message, sent once the app has returned

        async def send_tracked(message: dict) -> None:
            nonlocal started, streaming
            if message["type"] == "http.response.start":
                started = True
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", ()))
            elif streaming and message["type"] == "http.response.body" and not message.get("more_body", False):
                # Starlette's BaseHTTPMiddleware closes a stream cleanly even when its body iterator
                # raised, and then re-raises: hold the close, so a failure can still be told in the stream.
                held_end.append(message)
                return
            await send(message)

        async def refuse(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> None:
            response = error_response(status, ErrorBody(message=message, type=type_, code=status), headers)
            await response(scope, receive, send_tracked)

        admitted = scope["path"].startswith(ADMITTED_PREFIX)
        if admitted and self.in_flight >= self.limits.max_in_flight:
            await refuse(429, f"server busy: {self.in_flight} requests in flight on this replica (limit "
                         f"{self.limits.max_in_flight}); retry after {self.limits.retry_after_s} s",
                         "rate_limit_error", {"Retry-After": str(self.limits.retry_after_s)})
            return
        RequestGuard._in_flight += admitted
        try:
            body = await self._read_body(scope, receive)
            gone = asyncio.Event()  # set when the client disconnects
            replay = _replay(body, gone)
            if admitted:
                async with asyncio.timeout(self.limits.request_timeout_s):
                    await _run_until_gone(self.app(scope, replay, send_tracked), receive, gone, body is None)
            else:
                await _run_until_gone(self.app(scope, replay, send_tracked), receive, gone, body is None)
            if held_end:
                with contextlib.suppress(Exception):  # a client that left: nothing to close
                    await send(held_end[0])
        except _BodyTooLarge as exc:
            if not started:
                await refuse(413, str(exc), "request_too_large")
        except TimeoutError:
            message = f"no answer within request_timeout_s={self.limits.request_timeout_s} s; the request was cancelled"
            if started:
                log.warning("request %s %s cut at request_timeout_s=%s", scope["method"], scope["path"],
                            self.limits.request_timeout_s)
                if streaming:
                    await _end_stream(send, ErrorBody(message=message, type="timeout_error", code=504))
                return
            await refuse(504, message, "timeout_error")
        except Exception as exc:
            if started and streaming and _engine_gone(exc):
                log.warning("%s %s: the engine replica died mid-stream; the stream ends with an error event",
                            scope.get("method"), clip(scope.get("path", "")))
                await _end_stream(send, ErrorBody(message=ENGINE_GONE_MID_STREAM, type="engine_unavailable_error",
                                                  code=503))
                return
            log.exception("unhandled error on %s %s", scope.get("method"), clip(scope.get("path", "")))
            if started and streaming:
                await _end_stream(send, ErrorBody(message="internal error (logged on the server) mid-stream; the "
                                                  "request may be retried", type="internal_error", code=500))
                return
            if started:
                raise  # the server aborts the connection: the client sees a broken answer, not a short one
            await refuse(500, "internal error (logged on the server); the request may be retried",
                         "internal_error")
        finally:
            RequestGuard._in_flight -= admitted

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The body, read up to the limit (413 past it); None when the client left before sending it."""
        limit = self.limits.max_body_bytes
        too_large = f"request body over max_body_bytes={limit} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:  # the HTTP server refuses it before us; else the bytes read count
                    continue
                if declared > limit:
                    raise _BodyTooLarge(f"{too_large} (Content-Length: {declared})")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge(too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


ENGINE_GONE_MID_STREAM = ("the engine replica serving this stream stopped; Ray Serve is replacing it: "
                          "retry the request")


def _engine_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: Starlette wraps an error raised mid-response) is Ray's
    word that the engine replica died or cannot be reached."""
    from ray.exceptions import RayActorError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RayActorError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


async def _end_stream(send: Any, error: ErrorBody) -> None:
    """End a started SSE answer with an error event and ``[DONE]`` (nothing if the client left)."""
    event = ErrorResponse(error=error).model_dump_json(exclude_none=True)
    try:
        await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                    "more_body": False})
    except Exception:  # noqa: BLE001 - the connection is gone: there is no one to tell
        pass


def _replay(body: bytes | None, gone: asyncio.Event) -> Any:
    """The app's ``receive``: the body as one message, then the disconnect once it happens."""
    pending = [] if body is None else [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    return replay


async def _run_until_gone(call: Any, receive: Any, gone: asyncio.Event, left_already: bool) -> None:
    """Await the app; if the client disconnects first, cancel it and wait for it to unwind."""

    async def watch() -> None:  # the only reader of the server's receive once the body is read
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    if left_already:
        gone.set()
    app_task = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(watch())
    gone_task = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({app_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled (the timeout): never leave the app running
        watcher.cancel()
        gone_task.cancel()
        if not app_task.done():
            app_task.cancel()
            await asyncio.wait({app_task})
    if app_task.cancelled():
        log.info("client disconnected: request cancelled")
        return
    app_task.result()  # the app's own exception, if any


def has_lone_surrogate(value: Any) -> bool:
    """Whether any string in ``value`` (dicts, lists, tuples, pydantic models) holds a lone UTF-16
    surrogate (JSON "\\ud800"): Python accepts it, tokenizers raise TypeError on it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__pydantic_fields__"):
            stack.extend(vars(item).values())
    return False


def _text_chars(value: Any) -> int:
    """Characters in all strings of a prompt or a messages list."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def check_text(text: str, limits: LimitSettings, field: str = "text") -> None:
    """413 when ``text`` is over ``max_text_chars`` (before anything tokenizes it)."""
    if len(text) > limits.max_text_chars:
        raise ServingError(413, f"{field} is {len(text)} characters; the limit is max_text_chars="
                           f"{limits.max_text_chars}", type="request_too_large", param=field)


def _over(name: str, count: int, cap: int, setting: str) -> None:
    if count > cap:
        raise ServingError(422, f"{name}: {count} given, at most {cap} allowed ({setting})", param=name)


def check_openai_request(body: Any, limits: LimitSettings, max_logprobs: int = 20) -> None:
    """The OpenAI routes' caps on a parsed CompletionRequest / ChatCompletionRequest.

    Raises:
        ServingError: 422 (a count over its cap, negative or too many logprobs, a lone surrogate),
            413 (prompt or messages text over ``max_text_chars``), 400 (a chat message without a role).
    """
    _over("n", getattr(body, "n", None) or 1, limits.max_n, "limits.max_n")
    _over("best_of", getattr(body, "best_of", None) or 1, limits.max_n, "limits.max_n")
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        _over("prompt", len(prompt), limits.max_prompts, "limits.max_prompts")
    stop = getattr(body, "stop", None)
    stops = (1 if isinstance(stop, str) else len(stop or [])) + len(getattr(body, "stop_token_ids", None) or [])
    _over("stop", stops, limits.max_stop, "limits.max_stop")
    _over("logit_bias", len(getattr(body, "logit_bias", None) or {}), limits.max_logit_bias,
          "limits.max_logit_bias")
    for name in ("max_tokens", "max_completion_tokens"):  # capped later, but a budget below 1 is no budget
        value = getattr(body, name, None)
        if value is not None and value < 1:
            raise ServingError(422, f"{name} must be at least 1; got {clip(value)}", param=name)
    for name in ("logprobs", "top_logprobs"):
        value = getattr(body, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= max_logprobs:
            raise ServingError(422, f"{name} must be between 0 and {max_logprobs} (the engine's max_logprobs); "
                               f"got {clip(value)}", param=name)
    for i, message in enumerate(getattr(body, "messages", None) or []):
        # The request model also admits openai_harmony's Message (an `author`, a content list), which
        # vLLM's chat renderer then indexes as a dict (message["role"]): a TypeError, a 500 (found by
        # Schemathesis). Every chat message must be an object with a role.
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ServingError(400, f"messages[{i}] must be an object with a string 'role' (system, user, "
                               "assistant, ...) and its 'content'", param=f"messages[{i}]")
    text = prompt if prompt is not None else getattr(body, "messages", None)
    chars = _text_chars(text)
    if chars > limits.max_text_chars:
        field = "prompt" if prompt is not None else "messages"
        raise ServingError(413, f"{field} holds {chars} characters of text; the limit is max_text_chars="
                           f"{limits.max_text_chars}", type="request_too_large", param=field)
    if has_lone_surrogate(body):
        raise ServingError(422, "the request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid "
                           "Unicode text; send valid UTF-8")

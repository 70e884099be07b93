"""What the task handlers need from the engine, and the two engines the ingress shapes give them.

:class:`Engine` is the interface (a ``typing.Protocol``): a completions call that returns the
first (non-streamed) response, and a health check. The task handlers (``tasks.py``) and
``/healthz`` use only that, so a test can drive them with a small fake engine.

* :class:`HandleEngine` (``ingress: separate``): the engine replicas behind a Serve deployment
  handle, reached through Ray's ``OpenAiIngress._get_response`` (multiplexed routing by adapter id).
* :class:`LocalEngine` (``ingress: colocated``): Ray's ``LLMServer`` held in this replica and
  called in-process; the colocated ingress sends its OpenAI routes through :meth:`LocalEngine.stream` too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from lorafleet.registry import RegistryError
from lorafleet.serving.errors import ServingError, clip, registry_errors_as_409

__all__ = ["Engine", "HandleEngine", "LocalEngine", "first_completion"]

# ``OpenAiIngress._get_response``'s shape: keyword-only body, call_method ("completions", "chat"),
# raw_request; yields Ray Serve LLM's responses (or its ErrorResponse).
Stream = Callable[..., AsyncIterator[Any]]


class Engine(Protocol):
    """The engine as the task handlers see it."""

    async def complete(self, model_id: str, prompts: list[list[int]], **kwargs: Any) -> Any:
        """One greedy completions request over token-id prompts (one choice per prompt, by ``index``).

        ``model_id`` is the multiplexed id (the base model id or ``<base>:<name>@<version>``);
        ``kwargs`` are ``CompletionRequest`` fields (``max_tokens``, ``logprobs``, ...).
        """
        ...

    async def check_health(self) -> None:
        """Return once the engine answers; raise if it is unhealthy."""
        ...

    # Optional: ``async def label_logprobs(model_id, prompt, label_ids) -> list[float]``, /v1/classify's
    # scores in about one prompt pass (``label_scores.py``). Engines without it (tests' fakes) are
    # scored by TaskHandlers through ``complete``, one next-token row per label prefix.


async def first_completion(stream: Stream, model_id: str, prompts: list[list[int]], **kwargs: Any) -> Any:
    """Send a non-streamed completions request through ``stream``; its one response or a ServingError."""
    from lorafleet.serving._ray_llm import CompletionRequest, RayErrorResponse

    request = CompletionRequest(model=model_id, prompt=prompts if len(prompts) > 1 else prompts[0],
                                temperature=0.0, **kwargs)

    async def first():
        gen = stream(body=request, call_method="completions")
        try:
            return await gen.__anext__()
        finally:
            await gen.aclose()

    response = await registry_errors_as_409(first())
    if isinstance(response, RayErrorResponse):
        raise ServingError(response.error.code, response.error.message, type=response.error.type)
    return response


class HandleEngine:
    """The engine replicas behind a deployment handle (``ingress: separate``)."""

    def __init__(self, stream: Stream, handle: Any, base_id: str | None = None) -> None:
        self._stream = stream  # the ingress's OpenAiIngress._get_response (handle + multiplexed id)
        self._handle = handle
        self._base_id = base_id

    async def complete(self, model_id: str, prompts: list[list[int]], **kwargs: Any) -> Any:
        return await first_completion(self._stream, model_id, prompts, **kwargs)

    async def label_logprobs(self, model_id: str, prompt: list[int],
                             label_ids: list[list[int]]) -> list[float] | None:
        # Like OpenAiIngress: an adapter id routes by Serve's multiplexing, the base model to any replica.
        handle = self._handle if model_id == self._base_id else self._handle.options(multiplexed_model_id=model_id)
        return await registry_errors_as_409(handle.label_logprobs.remote(model_id, prompt, label_ids))

    async def check_health(self) -> None:
        await self._handle.check_health.remote()


class LocalEngine:
    """Ray's ``LLMServer`` (``RegistryLLMServer``) in this replica (``ingress: colocated``)."""

    def __init__(self, server: Any, base_id: str) -> None:
        self.server = server
        self._base_id = base_id

    async def stream(self, *, body: Any, call_method: str, raw_request: Any = None) -> AsyncIterator[Any]:
        """OpenAiIngress's engine call, made in-process: LLMServer's method instead of a handle's."""
        from lorafleet.serving._ray_llm import RawRequestInfo

        if body.model != self._base_id:  # "<base>:<name>@<version>": load it unless it is loaded
            await self._load(body.model)
        info = RawRequestInfo.from_starlette_request(raw_request) if raw_request is not None else None
        async for response in await getattr(self.server, call_method)(body, info):
            yield response

    async def _load(self, model_id: str) -> None:
        try:
            await self.server.load_adapter(model_id)
        except (ServingError, RegistryError):
            raise  # already say what is wrong (registry_errors_as_409 maps the registry's)
        except Exception as exc:
            # vLLM refused files that passed the registry's checks (a PEFT variant it cannot run, modules
            # the base lacks, ...): the adapter is unusable here, which is the client's to hear, not a 500.
            raise ServingError(422, f"the engine could not load adapter {clip(model_id)}: "
                               f"{clip(f'{type(exc).__name__}: {exc}', 400)}", type="adapter_load_error",
                               param="model") from exc

    async def complete(self, model_id: str, prompts: list[list[int]], **kwargs: Any) -> Any:
        return await first_completion(self.stream, model_id, prompts, **kwargs)

    async def label_logprobs(self, model_id: str, prompt: list[int],
                             label_ids: list[list[int]]) -> list[float] | None:
        if model_id != self._base_id:
            await self._load(model_id)  # its refusals as the OpenAI routes give them (409/422)
        return await self.server.label_logprobs(model_id, prompt, label_ids)

    async def check_health(self) -> None:
        await self.server.check_health()

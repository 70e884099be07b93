"""Every ``ray.llm._internal`` name lorafleet uses, in one place.

Ray Serve LLM's public API (``ray.serve.llm``) has ``LLMConfig``, ``LLMServer`` and the builders,
but not the OpenAI ingress we subclass, its protocol models or the LoRA loader we replace. Those
are internal and move between Ray releases (2.60 is the one tested, see pyproject.toml); a
rename then breaks this one module instead of every serving module.
"""

from __future__ import annotations

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
    "OpenAIHTTPException",
    "OpenAiIngress",
    "RawRequestInfo",
    "RayErrorResponse",
    "global_id_manager",
    "make_fastapi_ingress",
    "to_model_metadata",
]

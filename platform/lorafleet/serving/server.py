"""Ray Serve LLM's ``LLMServer`` with one fix: concurrent first uses of an adapter load it once.

Ray 2.60's ``VLLMEngine.resolve_lora`` checks "already loaded?" and then awaits the load, so two
requests that arrive together for a not-yet-loaded adapter both try to load it, and the second
fails with vLLM's "adapter has already been loaded" (a 500 for the client). Serializing the
resolve per adapter id closes that window; everything else is Ray's ``LLMServer`` unchanged.
``load_adapter`` is that resolve with an explicit id: the colocated ingress (``router.LorafleetServer``)
holds this server in its own replica and calls it directly, with no multiplexed request context.
``label_logprobs`` is /v1/classify's scoring, run next to the engine (``label_scores.py`` says why
it needs vLLM's engine client rather than the completions route).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from ray import serve
from ray.serve.llm import LLMServer

__all__ = ["RegistryLLMServer"]


class RegistryLLMServer(LLMServer):
    """``LLMServer`` whose LoRA resolution is serialized per adapter id, and callable by id."""

    _resolve_locks: dict[str, asyncio.Lock]

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load_adapter(model_id)

    async def load_adapter(self, model_id: str) -> None:
        """Load ``<base>:<name>@<version>`` into the engine unless it is there (Serve's LRU on top)."""
        if not hasattr(self, "_resolve_locks"):
            self._resolve_locks = defaultdict(asyncio.Lock)
        async with self._resolve_locks[model_id]:
            disk_lora_model = await self._load_model(model_id)
            await self.engine.resolve_lora(disk_lora_model)

    async def label_logprobs(self, model_id: str, prompt: list[int],
                             label_ids: list[list[int]]) -> list[float] | None:
        """log P(label tokens | prompt) per label under ``model_id`` (the base id or ``<base>:<name>@<version>``);
        None for an adapter with ``lm_head`` weights (the caller then scores through completions)."""
        from lorafleet.serving.label_scores import label_logprobs, trains_lm_head

        lora_request = None
        if model_id != self._llm_config.model_id:
            await self.load_adapter(model_id)
            # Ray's VLLMEngine keeps vLLM's OpenAI model registry: its LoRARequest for the loaded adapter.
            lora_request = self.engine._oai_models.lora_requests[model_id]
            if trains_lm_head(lora_request.lora_path):
                return None
        return await label_logprobs(self.engine._engine_client, prompt, label_ids, lora_request)

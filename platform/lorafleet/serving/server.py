"""Ray Serve LLM's ``LLMServer`` with one fix: concurrent first uses of an adapter load it once.

Ray 2.60's ``VLLMEngine.resolve_lora`` checks "already loaded?" and then awaits the load, so two
requests that arrive together for a not-yet-loaded adapter both try to load it, and the second
fails with vLLM's "adapter has already been loaded" (a 500 for the client). Serializing the
resolve per adapter id closes that window; everything else is Ray's ``LLMServer`` unchanged.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from ray import serve
from ray.serve.llm import LLMServer

__all__ = ["RegistryLLMServer"]


class RegistryLLMServer(LLMServer):
    """``LLMServer`` whose multiplexed LoRA resolution is serialized per adapter id."""

    _resolve_locks: dict[str, asyncio.Lock]

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return
        if not hasattr(self, "_resolve_locks"):
            self._resolve_locks = defaultdict(asyncio.Lock)
        async with self._resolve_locks[model_id]:
            await super()._maybe_resolve_lora_from_multiplex()

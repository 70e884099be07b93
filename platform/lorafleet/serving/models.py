"""Model names as clients send them -> what the engine serves (vLLM's ``serving_models.py`` role).

A client names the base model (its id, ``base``, or nothing) or a registry adapter (``name``,
``name@3``, ``name@canary``). Which version that is, is the catalog's decision
(:mod:`lorafleet.serving.catalog`), made again for each request, so a promotion reaches the next
request without a restart and a request in flight keeps its version. This module gives the OpenAI
routes that answer and the adapters' model cards, reading the registry on a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lorafleet.registry import Entry, RegistryError
from lorafleet.serving.catalog import MAX_REF_CHARS, AdapterCatalog
from lorafleet.serving.errors import ServingError

__all__ = ["ServingModels", "cap_tokens", "MAX_REF_CHARS"]


def cap_tokens(value: int | None, limit: int) -> int:
    """A client's token budget lowered to the server's cap (``None`` means the cap); never an error."""
    return limit if value is None else min(value, limit)


class ServingModels:
    """The base model and the registry's LoRA adapters, by the names clients use."""

    def __init__(self, catalog: AdapterCatalog, base_id: str) -> None:
        self.catalog = catalog
        self.base_id = base_id

    async def route(self, model: str | None) -> tuple[str, str, Entry | None]:
        """Client model name -> (multiplexed model id, 'name@version' or 'base', Entry|None)."""
        choice = await self.catalog.pick_model(model)
        return choice.model_id, choice.ref, choice.entry

    async def names(self) -> list[str]:
        """The LoRA adapters this server can serve, by name."""
        return await self.catalog.names()

    async def card(self, name: str, base_card: Any) -> Any:
        """:meth:`adapter_card`, read on a worker thread."""
        return await asyncio.to_thread(self.adapter_card, name, base_card)

    def adapter_card(self, name: str, base_card: Any) -> Any:
        """The ModelCard of a registry adapter (None if it does not resolve), modelled on the base's."""
        from lorafleet.serving._ray_llm import ModelCard

        try:
            entry = self.catalog.resolve(name, fresh_aliases=True)
        except (ServingError, RegistryError):
            return None
        return ModelCard(
            id=name, object="model", owned_by="lorafleet", permission=list(base_card.permission),
            metadata={"ref": entry.ref, "version": entry.version, "aliases": list(entry.aliases),
                      "task": entry.meta.task, "labels": entry.meta.labels, "base_model_id": self.base_id},
        )

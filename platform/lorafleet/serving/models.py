"""Model names as clients send them -> what the engine serves (vLLM's ``serving_models.py`` role).

A client names the base model (its id, ``base``, or nothing) or a registry adapter (``name``,
``name@3``, ``name@canary``). Each request is resolved to an exact version here, so a promotion
reaches the next request without a restart and a request in flight keeps its version.
"""

from __future__ import annotations

from typing import Any

from lorafleet.registry import RegistryError
from lorafleet.serving.adapters import BASE_ALIASES, AdapterCatalog
from lorafleet.serving.errors import ServingError, clip

__all__ = ["ServingModels", "cap_tokens", "MAX_REF_CHARS"]

MAX_REF_CHARS = 256  # longer than any "<base>:<name>@<version>" the registry can hold


def cap_tokens(value: int | None, limit: int) -> int:
    """A client's token budget lowered to the server's cap (``None`` means the cap); never an error."""
    return limit if value is None else min(value, limit)


class ServingModels:
    """The base model and the registry's LoRA adapters, by the names clients use."""

    def __init__(self, catalog: AdapterCatalog, base_id: str) -> None:
        self.catalog = catalog
        self.base_id = base_id

    def route(self, model: str | None, task: str | None = None) -> tuple[str, str, Any]:
        """Client model/adapter name -> (multiplexed model id, 'name@version' or 'base', Entry|None)."""
        if model is None or model == self.base_id or model in BASE_ALIASES:
            return self.base_id, "base", None
        if len(model) > MAX_REF_CHARS:
            raise ServingError(422, f"adapter name {clip(model)} is {len(model)} characters; names are at most "
                               f"{MAX_REF_CHARS}", param="adapter")
        try:
            entry = self.catalog.resolve(model, task=task)
        except RegistryError as exc:
            # The registry itself is unreadable for this name (e.g. a corrupt aliases.json): the
            # client's request was fine, the server's state is not; the message says the fix.
            raise ServingError(409, f"adapter {clip(model)} cannot be served: {exc}", type="registry_error",
                               param="adapter") from None
        return self.catalog.model_id(entry), entry.ref, entry

    def adapter_card(self, name: str, base_card: Any) -> Any:
        """The ModelCard of a registry adapter (None if it does not resolve), modelled on the base's."""
        from lorafleet.serving._ray_llm import ModelCard

        try:
            entry = self.catalog.resolve(name)
        except (ServingError, RegistryError):
            return None
        return ModelCard(
            id=name, object="model", owned_by="lorafleet", permission=list(base_card.permission),
            metadata={"ref": entry.ref, "version": entry.version, "aliases": list(entry.aliases),
                      "task": entry.metadata.get("task"), "labels": entry.metadata.get("labels"),
                      "base_model_id": self.base_id},
        )

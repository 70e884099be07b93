"""Whether a registered adapter can be served on this server's base model, decided before vLLM sees it.

Two kinds of adapter train and register fine but must not reach the engine:

* **DoRA** (``use_dora: true`` in ``adapter_config.json``, from ``method.lora.use_dora``): vLLM has no
  DoRA kernels and refuses to load it; in colocated mode that surfaced as a 500.
* **Another base**: an adapter's matrices fit any base of the same shapes, so vLLM would load it onto
  the wrong weights and answer garbage. Every artifact records its base's fingerprint at registration
  (``base_fingerprint`` in ``lorafleet.json``, ``lorafleet.base_model.base_fingerprint``); serving
  compares it with the served base's. Versions registered before fingerprints existed have none: they
  are served, with a warning logged once per version.

The ingress (``serving.catalog.AdapterCatalog``) turns a refusal into a 422 naming the reason and the fix,
and remembers it per version (a registered version never changes).
This module imports nothing heavy, so ``lorafleet adapters promote`` can warn with the same words.
"""

from __future__ import annotations

import logging
from typing import Any

from lorafleet.registry import Entry

__all__ = ["ADAPTER_CONFIG", "FINGERPRINT_KEY", "adapter_config", "base_refusal", "dora_refusal"]

ADAPTER_CONFIG = "adapter_config.json"
FINGERPRINT_KEY = "base_fingerprint"  # lorafleet.json key (ArtifactMetadata.base_fingerprint)

logger = logging.getLogger(__name__)
_warned: set[str] = set()  # version folders already warned about (no fingerprint), so logs do not flood


def adapter_config(entry: Entry) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a registry version (folder or object store); {} if
    absent or unreadable."""
    try:
        config = entry.read_json(ADAPTER_CONFIG)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def dora_refusal(entry: Entry) -> str | None:
    """Why a DoRA adapter cannot be served (None for any other artifact)."""
    if adapter_config(entry).get("use_dora") is not True:
        return None
    return (f"{entry.ref} is a DoRA adapter (use_dora: true in its {ADAPTER_CONFIG}); DoRA adapters cannot "
            "be served by vLLM: retrain it with method.lora.use_dora=false (`lorafleet eval` still scores it)")


def base_refusal(entry: Entry, served_fingerprint: str | None, served_base: str) -> str | None:
    """Why ``entry`` must not be served on the base ``served_base`` (None if it may be).

    Args:
        entry: A registry version.
        served_fingerprint: ``base_fingerprint`` of the served base; None skips the check.
        served_base: The served base's path or name, for the message.
    """
    recorded = entry.meta.base_fingerprint
    if served_fingerprint is None:
        return None
    if not recorded:
        if str(entry.path) not in _warned:
            _warned.add(str(entry.path))
            logger.warning("%s records no base fingerprint (registered before fingerprints were recorded); "
                           "serving it on %s unchecked: re-register it to have it checked", entry.ref, served_base)
        return None
    if recorded == served_fingerprint:
        return None
    trained_on = entry.meta.base_model or "an unrecorded base"
    return (f"{entry.ref} was trained on base model {trained_on!r} (fingerprint {recorded[:19]}...), but this "
            f"server serves {served_base!r} (fingerprint {served_fingerprint[:19]}...); serve it with the base "
            "it was trained on, or retrain it on this one")

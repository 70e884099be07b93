"""The bridge between the lorafleet registry and Ray Serve LLM's multiplexed LoRA loading.

Why this shape (see docs/SERVING.md):

* Ray Serve LLM's ``LoraConfig.dynamic_lora_loading_path`` accepts only s3/gs/abfss/azure URIs,
  but its ``LLMServer`` takes the loader *class* as an injectable dependency
  (``model_downloader``). :class:`RegistryLoraLoader` is that loader for the registry: Serve's
  multiplexing (per-replica LRU of ``max_loras`` adapters, routing a request to a replica that
  has its adapter) and vLLM's batching of different adapters in one engine step stay Ray's and
  vLLM's; only "where do the files come from" is ours. No object store, no copy of the registry.
* The ingress (``serving.catalog.AdapterCatalog``, re-exported here) turns a client's ``name`` /
  ``name@version`` into an *exact* version before routing: the multiplexed model id is
  ``<base>:<name>@<version>``. A promotion therefore changes the id new requests use (picked up
  without a restart), while a request in flight keeps the version it was resolved to: every
  response comes from one version.
* The replica copies the version folder into a private cache and checks every file's sha256
  against the registry metadata *on the copy*, then gives vLLM the copy: what vLLM reads is what
  was checked, and a later change or removal in the registry cannot reach a loaded adapter.
* Names go through ``registry.validate_name`` and versions are digits, so no request can make
  the server read a path outside the registry.
* The ingress refuses (422) what vLLM must not load: DoRA adapters and adapters trained on another
  base (compat.py). A version removed between the ingress's resolve and the replica's copy raises
  ``ArtifactNotFoundError`` (serving's 404).
* The private copies live at ``<cache>/<name>@<version>`` (one path per id, the path vLLM keeps for
  it) and are bounded: when Serve's LRU drops an adapter (it calls the returned config's ``__del__``)
  its copy becomes the first to delete, and at most ``2 * max_loras`` copies are kept per replica;
  a later request for a deleted one copies and checks it again, to the same path.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from lorafleet.registry import Registry, RegistryError, validate_name
from lorafleet.serving.catalog import BASE_ALIASES, AdapterCatalog
from lorafleet.serving.copies import (
    CACHE_PREFIX,
    AdapterIntegrityError,
    CopyCache,
    copy_verified,
    remove_orphan_caches,
)

__all__ = [
    "AdapterCatalog",
    "AdapterIntegrityError",
    "CopyCache",
    "RegistryLoraLoader",
    "copy_verified",
    "REGISTRY_ROOT_KEY",
    "BASE_ALIASES",
]

# Where the replica's loader finds the registry: LLMConfig.experimental_configs[REGISTRY_ROOT_KEY].
REGISTRY_ROOT_KEY = "lorafleet_registry_root"


# --------------------------------------------------------------------------------------------
# Replica side: Ray Serve LLM's LoRA loader, reading from the registry.
# --------------------------------------------------------------------------------------------


def _parse_exact(lora_id: str) -> tuple[str, str]:
    """``name@version`` -> (name, version); anything else is refused (the ingress sends exact ids)."""
    name, sep, version = lora_id.partition("@")
    validate_name(name)
    if not sep or not version.isdigit():
        raise RegistryError(f"adapter id {lora_id!r} is not 'name@version'")
    return name, version


try:  # Ray Serve LLM is an optional dependency of the library as a whole.
    from pydantic import PrivateAttr

    from lorafleet.serving._ray_llm import DiskMultiplexConfig, LoraModelLoader as _LoraModelLoader

    class _ReleasingConfig(DiskMultiplexConfig):
        """The loader's answer: Serve's multiplexing calls a model's ``__del__`` when its LRU drops it
        (``ray.serve.multiplex``, "clean up the model resources eagerly"); that releases the copy."""

        _on_release: Any = PrivateAttr(default=None)

        def __del__(self) -> None:  # also runs at garbage collection: the token makes it a no-op then
            try:
                on_release, self._on_release = self._on_release, None
            except Exception:  # noqa: BLE001 - a half-built object being collected
                return
            if on_release is not None:
                on_release()
except ImportError:  # pragma: no cover
    _LoraModelLoader = object  # type: ignore[assignment,misc]

_remove_orphan_caches = remove_orphan_caches  # the name tests/test_serving_units.py imports
_DEFAULT_MAX_LORAS = 4  # when the LLMConfig names none (tests' stand-ins)


class RegistryLoraLoader(_LoraModelLoader):  # type: ignore[misc,valid-type]
    """Ray Serve LLM's LoRA loader (``LLMServer(model_downloader=...)``) for the lorafleet registry.

    Serve calls :meth:`load_model_from_config` with the multiplexed id ``<base>:<name>@<version>``
    on the first request for it in this replica (Serve's LRU then keeps up to
    ``max_num_adapters_per_replica`` of them); the returned ``DiskMultiplexConfig.local_path`` is
    what ``LLMServer`` hands to vLLM.
    """

    def __init__(self, lora_root: str | None = None, download_timeout_s: float | None = None,
                 max_tries: int = 1) -> None:
        # A private cache per replica process, so replicas never share (or delete) each other's files.
        # A replica killed by Serve never runs atexit, so each new one first removes the caches of
        # replicas whose process is gone (the pid is in the folder name).
        if lora_root is None:
            remove_orphan_caches(Path(tempfile.gettempdir()))
            lora_root = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-")
        super().__init__(lora_root=lora_root, download_timeout_s=download_timeout_s, max_tries=max_tries)
        atexit.register(shutil.rmtree, lora_root, True)
        self.copies: CopyCache | None = None  # made at the first load, when max_loras is known
        self._int_ids: dict[str, int] = {}  # one vLLM int id per model id, kept across re-copies

    def _copy_cache(self, llm_config: Any) -> CopyCache:
        if self.copies is None:
            lora_config = getattr(llm_config, "lora_config", None)
            max_loras = getattr(lora_config, "max_num_adapters_per_replica", None) or _DEFAULT_MAX_LORAS
            loader = weakref.ref(self)

            def forget(ref: str) -> None:  # a deleted copy: its next request loads it again
                if (me := loader()) is not None:
                    for model_id in [m for m in me.disk_cache if m.partition(":")[2] == ref]:
                        me.disk_cache.pop(model_id, None)

            self.copies = CopyCache(Path(self.lora_root), 2 * max_loras, on_drop=forget)
        return self.copies

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any):
        """Resolve, copy and verify ``<base>:<name>@<version>``; concurrent first uses share one load.

        Each call answers a new config object (Serve's LRU keeps one per id and calls its ``__del__``
        when it drops it, which marks the copy released in :class:`CopyCache`)."""
        root = llm_config.experimental_configs.get(REGISTRY_ROOT_KEY)
        if not root:
            raise RegistryError(f"LLMConfig.experimental_configs lacks {REGISTRY_ROOT_KEY!r}")
        copies = self._copy_cache(llm_config)
        config = self.disk_cache.get(lora_model_id)
        if config is None:
            task = self.active_syncing_tasks.get(lora_model_id)
            if task is None:
                task = asyncio.create_task(asyncio.to_thread(self._load_sync, lora_model_id, root))
                self.active_syncing_tasks[lora_model_id] = task
                task.add_done_callback(lambda _: self.active_syncing_tasks.pop(lora_model_id, None))
            config = await asyncio.shield(task)
            self.disk_cache[lora_model_id] = config
        ref = lora_model_id.partition(":")[2]
        token = copies.added(ref)  # held by Serve's LRU from now on; may delete older copies
        handed = config.model_copy()
        handed._on_release = lambda: copies.released(ref, token)
        return handed

    def _load_sync(self, lora_model_id: str, registry_root: str):
        from lorafleet.serving._ray_llm import global_id_manager

        name, version = _parse_exact(lora_model_id.partition(":")[2])
        entry = Registry(registry_root).resolve(f"{name}@{version}")  # ArtifactNotFoundError if removed
        # One path per id: vLLM keeps the first path it was given for an id and may re-read it.
        local = copy_verified(entry, Path(self.lora_root), dest_name=entry.ref)
        if lora_model_id not in self._int_ids:
            self._int_ids[lora_model_id] = global_id_manager.next()
        return _ReleasingConfig.model_validate({
            "model_id": lora_model_id,
            "max_total_tokens": None,
            "local_path": str(local),
            "lora_assigned_int_id": self._int_ids[lora_model_id],
        })

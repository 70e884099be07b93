"""The bridge between the lorafleet registry and Ray Serve LLM's multiplexed LoRA loading.

Why this shape (see docs/SERVING.md):

* Ray Serve LLM's ``LoraConfig.dynamic_lora_loading_path`` accepts only s3/gs/abfss/azure URIs,
  but its ``LLMServer`` takes the loader *class* as an injectable dependency
  (``model_downloader``). :class:`RegistryLoraLoader` is that loader for the registry: Serve's
  multiplexing (per-replica LRU of ``max_loras`` adapters, routing a request to a replica that
  has its adapter) and vLLM's batching of different adapters in one engine step stay Ray's and
  vLLM's; only "where do the files come from" is ours. No object store, no copy of the registry.
* The ingress (:class:`AdapterCatalog`) turns a client's ``name`` / ``name@version`` into an
  *exact* version before routing: the multiplexed model id is ``<base>:<name>@<version>``. A
  promotion therefore changes the id new requests use (picked up without a restart), while a
  request in flight keeps the version it was resolved to: every response comes from one version.
* The replica copies the version folder into a private cache and checks every file's sha256
  against the registry metadata *on the copy*, then gives vLLM the copy: what vLLM reads is what
  was checked, and a later change or removal in the registry cannot reach a loaded adapter.
* Names go through ``registry.validate_name`` and versions are digits, so no request can make
  the server read a path outside the registry.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from lorafleet.registry import (
    Entry,
    LocalStorage,
    Registry,
    RegistryError,
    checksums,
    validate_name,
    verify_folder,
)
from lorafleet.serving.errors import ServingError

__all__ = [
    "AdapterCatalog",
    "AdapterIntegrityError",
    "RegistryLoraLoader",
    "REGISTRY_ROOT_KEY",
    "BASE_ALIASES",
]

# Where the replica's loader finds the registry: LLMConfig.experimental_configs[REGISTRY_ROOT_KEY].
REGISTRY_ROOT_KEY = "lorafleet_registry_root"
# Adapter values meaning "no adapter, the bare base model" on the task endpoints.
BASE_ALIASES = ("base",)
_ADAPTER_CONFIG = "adapter_config.json"


class AdapterIntegrityError(RegistryError):
    """An adapter's files do not match the sha256 sums recorded when it was registered."""


# --------------------------------------------------------------------------------------------
# Ingress side: names -> exact versions, listing, validation.
# --------------------------------------------------------------------------------------------


class AdapterCatalog:
    """Resolves client adapter references against the registry (read-only).

    Args:
        registry_root: ``<home>/registry``.
        base_model_id: The served base model's id (the multiplexed ids' prefix).
        max_lora_rank: The engine's ``max_lora_rank``; higher-rank adapters are refused up front.
    """

    def __init__(self, registry_root: str | Path, base_model_id: str, max_lora_rank: int) -> None:
        self.registry = Registry(registry_root)
        self.base_model_id = base_model_id
        self.max_lora_rank = max_lora_rank

    def available(self) -> list[str]:
        """Names of registered LoRA adapters (their live versions are what 'name' means)."""
        out = []
        for name in self.registry.names():
            try:
                entry = self.registry.resolve(name)
            except RegistryError:
                continue
            if is_lora(entry):
                out.append(name)
        return out

    def resolve(self, ref: str, *, task: str | None = None) -> Entry:
        """The exact registry version ``ref`` names, checked to be a servable LoRA adapter.

        Args:
            ref: ``name``, ``name@version``, ``name@alias``, or ``<base_model_id>:name[@version]``.
            task: If given, the adapter's registered task must match.

        Raises:
            ServingError: 404 (unknown name/version; lists what exists), 422 (malformed reference,
                not a LoRA adapter, wrong task, rank above the engine's max_lora_rank).
        """
        prefix = f"{self.base_model_id}:"
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
        name = ref.partition("@")[0]
        try:
            validate_name(name)
        except RegistryError as exc:
            raise ServingError(422, str(exc), param="adapter", available=self.available()) from None
        try:
            entry = self.registry.resolve(ref)
        except RegistryError as exc:
            available = self.available()
            if name not in self.registry.names():
                raise ServingError(
                    404, f"adapter {name!r} not found; available: {available} (or the base model "
                    f"{self.base_model_id!r})", type="not_found_error", param="adapter", available=available,
                ) from None
            raise ServingError(404, str(exc), type="not_found_error", param="adapter",
                               available=[e.ref for e in self.registry.list(name)]) from None
        if not is_lora(entry):
            raise ServingError(
                422, f"{entry.ref} is a '{entry.metadata.get('method', 'unknown')}' artifact, not a LoRA "
                "adapter; only LoRA adapters are served on this base model", param="adapter",
                available=self.available(),
            )
        registered_task = entry.metadata.get("task")
        if task is not None and registered_task and registered_task != task:
            same = [n for n in self.available() if self.registry.resolve(n).metadata.get("task") == task]
            raise ServingError(
                422, f"{entry.ref} was trained for task {registered_task!r}, not {task!r}; use one of {same}",
                param="adapter", available=same,
            )
        rank = _adapter_rank(entry.path)
        if rank is not None and rank > self.max_lora_rank:
            raise ServingError(
                422, f"{entry.ref} has LoRA rank {rank}, above the server's max_lora_rank="
                f"{self.max_lora_rank}; raise max_lora_rank in the serve config", param="adapter",
            )
        return entry

    def model_id(self, entry: Entry) -> str:
        """The multiplexed model id of an exact version: ``<base>:<name>@<version>``."""
        return f"{self.base_model_id}:{entry.ref}"


def is_lora(entry: Entry) -> bool:
    """Whether a registry entry is a peft LoRA adapter (vLLM can only multiplex those)."""
    method = entry.metadata.get("method")
    return (method in (None, "lora")) and _ADAPTER_CONFIG in (entry.metadata.get("files") or {})


def _adapter_rank(folder: Path) -> int | None:
    try:
        config = json.loads((folder / _ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r")
    return int(rank) if isinstance(rank, int) else None


# --------------------------------------------------------------------------------------------
# Replica side: Ray Serve LLM's LoRA loader, reading from the registry.
# --------------------------------------------------------------------------------------------


def copy_verified(entry: Entry, cache_root: Path) -> Path:
    """Copy a registry version into ``cache_root`` and check the copy against its sha256 sums.

    Returns the folder holding the verified copy (what vLLM loads).

    Raises:
        AdapterIntegrityError: A listed file is missing or differs, or an unlisted file is present.
    """
    files = checksums(entry.metadata, entry.ref, error=AdapterIntegrityError)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
    try:
        # The registry's own copy-out and sha256 check, run on the private copy vLLM will read.
        LocalStorage(entry.path).copy_out("", tmp)
        verify_folder(tmp, files, entry.ref, error=AdapterIntegrityError, private_copy=True)
        final = cache_root / f"{entry.name}@{entry.version}-{uuid.uuid4().hex[:8]}"
        tmp.rename(final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parse_exact(lora_id: str) -> tuple[str, str]:
    """``name@version`` -> (name, version); anything else is refused (the ingress sends exact ids)."""
    name, sep, version = lora_id.partition("@")
    validate_name(name)
    if not sep or not version.isdigit():
        raise RegistryError(f"adapter id {lora_id!r} is not 'name@version'")
    return name, version


try:  # Ray Serve LLM is an optional dependency of the library as a whole.
    from lorafleet.serving._ray_llm import LoraModelLoader as _LoraModelLoader
except ImportError:  # pragma: no cover
    _LoraModelLoader = object  # type: ignore[assignment,misc]


_CACHE_PREFIX = "lorafleet-lora-"


def _remove_orphan_caches(tmp: Path) -> None:
    """Delete ``lorafleet-lora-<pid>-*`` folders whose process no longer exists on this machine."""
    for d in tmp.glob(f"{_CACHE_PREFIX}*-*"):
        pid = d.name[len(_CACHE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
            _remove_orphan_caches(Path(tempfile.gettempdir()))
            lora_root = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
        super().__init__(lora_root=lora_root, download_timeout_s=download_timeout_s, max_tries=max_tries)
        atexit.register(shutil.rmtree, lora_root, True)

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any):
        """Resolve, copy and verify ``<base>:<name>@<version>``; concurrent first uses share one load."""
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        task = self.active_syncing_tasks.get(lora_model_id)
        if task is None:
            root = llm_config.experimental_configs.get(REGISTRY_ROOT_KEY)
            if not root:
                raise RegistryError(f"LLMConfig.experimental_configs lacks {REGISTRY_ROOT_KEY!r}")
            task = asyncio.create_task(asyncio.to_thread(self._load_sync, lora_model_id, Path(root)))
            self.active_syncing_tasks[lora_model_id] = task
            task.add_done_callback(lambda _: self.active_syncing_tasks.pop(lora_model_id, None))
        config = await asyncio.shield(task)
        self.disk_cache[lora_model_id] = config
        return config

    def _load_sync(self, lora_model_id: str, registry_root: Path):
        from lorafleet.serving._ray_llm import DiskMultiplexConfig, global_id_manager

        name, version = _parse_exact(lora_model_id.partition(":")[2])
        entry = Registry(registry_root).resolve(f"{name}@{version}")
        local = copy_verified(entry, Path(self.lora_root))
        return DiskMultiplexConfig.model_validate({
            "model_id": lora_model_id,
            "max_total_tokens": None,
            "local_path": str(local),
            "lora_assigned_int_id": global_id_manager.next(),
        })

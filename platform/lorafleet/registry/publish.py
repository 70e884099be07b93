"""Writing a new version: the caller's inputs checked, the folder staged under a hidden key, hashed and
published as the next free version number (``Registry.register``'s steps; ``Storage`` does the I/O)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorafleet.registry._constants import METADATA_FILE, TMP_PREFIX
from lorafleet.registry.errors import RegistryError
from lorafleet.registry.layout import caller_metadata, name_key, version_numbers
from lorafleet.registry.refs import validate_name
from lorafleet.registry.storage import Storage, local_folder

__all__ = ["check_inputs", "stage_and_publish"]

# Bound on publish retries; only reached if something keeps creating version folders.
_MAX_RENAME_TRIES = 1000


def check_inputs(name: str, src_dir: str | Path, metadata: Any) -> tuple[Path, dict[str, Any]]:
    """Validate ``register``'s inputs before anything is written; returns (src, caller metadata)."""
    validate_name(name)
    src = local_folder(src_dir)
    if src is None:
        raise RegistryError(
            f"cannot register {name!r}: {Path(src_dir).expanduser()} is not a folder; pass the "
            "folder the training run saved (e.g. its adapter/ or model/ folder)"
        )
    return src, caller_metadata(name, metadata)


def stage_and_publish(storage: Storage, name: str, src: Path, meta: dict[str, Any]) -> str:
    """Copy ``src`` to a staging key, hash it, publish it; returns the new version."""
    tmp = f"{name_key(storage, name)}/{TMP_PREFIX}{uuid.uuid4().hex}"
    storage.check_inside(tmp)
    try:
        try:
            storage.copy_in(src, tmp, exclude=(METADATA_FILE,))
        except OSError as exc:
            # e.g. a dangling symlink or unreadable file in the source folder.
            raise RegistryError(
                f"cannot copy {src} into the registry: {exc}; fix or remove the "
                "offending files and register again"
            ) from None
        files, size = storage.hash_files(tmp, exclude=(METADATA_FILE,))
        meta.update(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=files,
            size_bytes=size,
            name=name,
        )
        return _publish_next(storage, name, tmp, meta)
    except BaseException:
        storage.discard(tmp)
        raise

def _publish_next(storage: Storage, name: str, tmp: str, meta: dict[str, Any]) -> str:
    """Publish ``tmp`` as the next free version number, retrying past taken ones.

    The version number is inside lorafleet.json, so it is rewritten before each try.
    """
    folder = name_key(storage, name)
    candidate = 0
    for _ in range(_MAX_RENAME_TRIES):
        # Count every numeric folder (finished or not) so junk never blocks a number.
        taken = version_numbers(storage, name, valid_only=False)
        candidate = max(candidate, taken[-1] if taken else 0) + 1
        version = str(candidate)
        meta["version"] = version
        storage.write_json(f"{tmp}/{METADATA_FILE}", meta)
        if storage.publish(tmp, f"{folder}/{version}"):
            return version
    raise RegistryError(  # pragma: no cover - needs a pathological writer
        f"could not find a free version number for {name!r} after "
        f"{_MAX_RENAME_TRIES} tries; check {storage.locate(folder)} for stray "
        "numeric folders"
    )

"""``copy_verified``: a registry version copied to a local folder, every sha256 checked on the copy.

What a loader then reads is what was checked, from a folder or an object-store registry alike:
serving's per-replica adapter copies (``serving/copies.py``) and ``Registry.local_path``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from lorafleet.registry._constants import METADATA_FILE, TMP_PREFIX
from lorafleet.registry.errors import ArtifactNotFoundError, RegistryError
from lorafleet.registry.integrity import checksums, verify_folder
from lorafleet.registry.layout import Entry
from lorafleet.registry.storage import LocalStorage

__all__ = ["copy_verified"]


def copy_verified(entry: Entry, cache_root: Path, dest_name: str | None = None, *,
                  error: type[RegistryError] = RegistryError) -> Path:
    """Copy a registry version into ``cache_root`` and check the copy against its sha256 sums.

    What a loader then reads is what was checked, and a later change or removal in the registry
    cannot reach it (serving's private adapter copies; ``Registry.local_path`` for an object store).

    Args:
        entry: The registry version (from a ``Registry``, so it knows its storage).
        cache_root: The folder the copy goes under.
        dest_name: The copy's folder name (an older copy there is replaced); default: a fresh name.
        error: Raised when a file is missing, differs or is not listed.

    Raises:
        ArtifactNotFoundError: The version was removed from the registry before or while copying.
    """
    storage = entry.storage if entry.storage is not None else LocalStorage(Path(entry.path).parent.parent)
    files = checksums(entry.metadata, entry.ref, error=error)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        try:
            storage.copy_out(entry.key, tmp)
        except OSError:  # shutil.Error is one too: a removal renames the version away mid-copy
            if storage.is_file(f"{entry.key}/{METADATA_FILE}"):
                raise
            raise ArtifactNotFoundError(f"{entry.ref} was removed from the registry while being loaded; "
                                        "request the adapter again for its current version") from None
        verify_folder(tmp, files, entry.ref, error=error, private_copy=True)
        final = cache_root / (dest_name or f"{entry.name}@{entry.version}-{uuid.uuid4().hex[:8]}")
        if final.exists():
            shutil.rmtree(final)  # an older copy of this id, inside the cache
        tmp.rename(final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""sha256 of local files: the one checksum routine and the one check of a folder against a
version's recorded sums, for the registry (``LocalStorage``) and for checked copies (``copies.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorafleet.registry._constants import METADATA_FILE
from lorafleet.registry.errors import RegistryError
from lorafleet.registry.metadata import ArtifactMetadata

__all__ = ["checksums", "sha256_file", "verify_folder"]

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    """sha256 hex digest of one file; with ``fsync``, also flush it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def checksums(
    metadata: Mapping[str, Any], ref: str, *, error: type[RegistryError] = RegistryError
) -> dict[str, str]:
    """The ``files`` map of a version's metadata; ``error`` if it has none (or not as {path: sha256})."""
    files = ArtifactMetadata.read(metadata).files
    if not files:
        raise error(f"{ref} has no file checksums in {METADATA_FILE}; re-register it")
    return files


def verify_folder(
    folder: Path,
    files: Mapping[str, str],
    ref: str,
    *,
    error: type[RegistryError] = RegistryError,
    inside: Callable[[Path], bool] | None = None,
    private_copy: bool = False,
) -> None:
    """Check ``folder`` against ``files`` ({relative path: sha256}) and raise on the first problem.

    Args:
        folder: A registry version folder, or a private copy of one.
        files: The checksums recorded at registration (see ``checksums``).
        ref: ``name@version``, for messages.
        error: The exception class raised.
        inside: Refuses listed files for which it returns False (a registry version must not
            point out of the registry).
        private_copy: ``folder`` is a copy about to be loaded: a symlink counts as a missing
            file (the copy must hold what was checked), and messages say the load is refused.

    Raises:
        error: Naming the first listed file (in sorted order) that is missing, outside or
            modified, or a present file that is not listed (it could change what a loader
            picks up).
    """
    for rel, expected in sorted(files.items()):
        file = folder / rel
        if inside is not None and not inside(file):
            raise error(
                f"{ref}: listed file {rel!r} points outside the registry; re-register it"
            )
        if (private_copy and file.is_symlink()) or not file.is_file():
            raise error(f"{ref}: file {rel!r} is missing; re-register it")
        if sha256_file(file) != expected:
            advice = "half-written); not loading it" if private_copy else "corrupt)"
            raise error(
                f"{ref}: file {rel!r} does not match its sha256 (modified or {advice}; "
                "re-register it"
            )
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() or (private_copy and p.is_symlink())
    }
    extra = sorted(present - set(files) - {METADATA_FILE})
    if extra:
        advice = "" if private_copy else "; delete it or re-register the artifact"
        raise error(f"{ref}: file {extra[0]!r} is not in the registered file list{advice}")

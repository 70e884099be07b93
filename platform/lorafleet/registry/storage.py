"""The registry's storage seam: the ``Storage`` protocol and ``LocalStorage``, its filesystem backend.

The registry (``registry.py``) only speaks ``Storage``; every filesystem call of the registry
package is in this module. Keys are posix paths relative to the registry root ("" is the root,
``"m/2/lorafleet.json"`` a file); a "folder" is a key prefix, so an object store
(``s3://bucket/prefix`` with the same layout) can implement the protocol without folders:

* ``publish`` is the one atomic step. Locally it is a no-replace ``os.rename`` of the staged
  folder; an object store copies the staged objects to the final prefix and writes the
  metadata object (``lorafleet.json``) last, with a create-only condition, and returns False if
  it exists. Readers ignore a version whose metadata is missing, so either way a version is
  seen whole or not at all.
* ``delete_tree`` makes the tree vanish first (locally a rename out of sight; an object store
  deletes the metadata object first) and then removes the rest.
* ``hash_files`` / ``verify_files`` are the sha256 checks on write and on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

from lorafleet.registry.errors import ArtifactNotFoundError, RegistryError
from lorafleet.registry.layout import METADATA_FILE, TMP_PREFIX

if TYPE_CHECKING:
    from lorafleet.registry.layout import Entry

try:  # POSIX only; without it alias updates are merely atomic, not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LocalStorage",
    "Storage",
    "copy_verified",
    "open_storage",
    "checksums",
    "local_folder",
    "sha256_file",
    "verify_folder",
]

_TRASH_PREFIX = ".trash-"
_LOCK_FILE = ".aliases.lock"
_HASH_CHUNK = 1 << 20


class Storage(Protocol):
    """What the registry needs from where it keeps its files (see the module docstring)."""

    def locate(self, key: str) -> Path | str:
        """Where ``key`` lives, for messages and ``Entry.path``: a Path, or a URI for an object store."""

    def check_inside(self, key: str) -> None:
        """Raise RegistryError if ``key`` resolves outside the root (e.g. via a symlink)."""

    def list_dirs(self, key: str) -> list[str]:
        """Names of the sub-folders (prefixes) directly under ``key``; [] if there are none."""

    def is_file(self, key: str) -> bool:
        """Whether a file (object) exists at ``key``."""

    def read_json(self, key: str) -> Any:
        """Parse the JSON at ``key``; FileNotFoundError if absent, ValueError if malformed."""

    def write_json(self, key: str, data: Any) -> None:
        """Write ``data`` as JSON so that readers see the old or the new content, never half."""

    def make_dirs(self, key: str) -> None:
        """Make sure folder ``key`` exists (a no-op for an object store)."""

    def copy_in(self, src: Path, key: str, *, exclude: Collection[str] = ()) -> None:
        """Copy local folder ``src`` (symlinks followed) to the new ``key``, minus top-level
        names in ``exclude``; OSError if ``src`` cannot be read."""

    def copy_out(self, key: str, dst: Path) -> None:
        """Copy the tree at ``key`` to the new local folder ``dst`` as it is (symlinks kept)."""

    def hash_files(
        self, key: str, *, exclude: Collection[str] = ()
    ) -> tuple[dict[str, str], int]:
        """({relative path: sha256}, total bytes) of the files under ``key`` (top-level names
        in ``exclude`` skipped), made durable on the way."""

    def verify_files(self, key: str, files: Mapping[str, str], ref: str) -> None:
        """Check the tree at ``key`` against ``files`` (see ``verify_folder``)."""

    def publish(self, staged: str, final: str) -> bool:
        """Make the staged tree appear whole at ``final``; False if ``final`` is taken."""

    def discard(self, key: str) -> None:
        """Best-effort removal of a staged tree (a failed write); never raises."""

    def delete_tree(self, key: str) -> None:
        """Make the tree at ``key`` vanish at once, then delete its contents."""

    def lock(self, key: str) -> ContextManager[None]:
        """Serialise read-modify-write of the small files under ``key`` between processes."""


class LocalStorage:
    """``Storage`` in a local folder (or a filesystem every node mounts at the same path).

    Args:
        root: The registry folder; created on the first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def locate(self, key: str) -> Path:
        return self.root / key

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root.resolve())

    def check_inside(self, key: str) -> None:
        path = self.locate(key)
        if not self._inside(path):
            raise RegistryError(
                f"refusing to use {path}: it resolves outside the registry root "
                f"{self.root.resolve()} (remove the symlink or fix the path)"
            )

    def list_dirs(self, key: str) -> list[str]:
        try:
            with os.scandir(self.locate(key)) as it:
                return [e.name for e in it if e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def is_file(self, key: str) -> bool:
        return self.locate(key).is_file()

    def read_json(self, key: str) -> Any:
        with open(self.locate(key), encoding="utf-8") as f:
            return json.load(f)

    def write_json(self, key: str, data: Any) -> None:
        # Temp file + fsync + os.replace in the same folder: readers see old or new, never half.
        path = self.locate(key)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(path.parent)

    def make_dirs(self, key: str) -> None:
        self.locate(key).mkdir(parents=True, exist_ok=True)

    def copy_in(self, src: Path, key: str, *, exclude: Collection[str] = ()) -> None:
        def ignore(folder: str, names: list[str]) -> set[str]:
            return set(exclude) if Path(folder) == src else set()

        shutil.copytree(src, self.locate(key), symlinks=False, ignore=ignore)

    def copy_out(self, key: str, dst: Path) -> None:
        shutil.copytree(self.locate(key), dst, symlinks=True)

    def hash_files(
        self, key: str, *, exclude: Collection[str] = ()
    ) -> tuple[dict[str, str], int]:
        folder = self.locate(key)
        files: dict[str, str] = {}
        total = 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel in exclude:
                continue
            # Hashing already reads the file, so flush it to disk in the same pass.
            files[rel] = sha256_file(path, fsync=True)
            total += path.stat().st_size
        return files, total

    def verify_files(self, key: str, files: Mapping[str, str], ref: str) -> None:
        verify_folder(self.locate(key), files, ref, inside=self._inside)

    def publish(self, staged: str, final: str) -> bool:
        _fsync_dir(self.locate(staged))
        if not _rename_noreplace(self.locate(staged), self.locate(final)):
            return False
        _fsync_dir(self.locate(final).parent)
        return True

    def discard(self, key: str) -> None:
        shutil.rmtree(self.locate(key), ignore_errors=True)

    def delete_tree(self, key: str) -> None:
        # Rename out of sight first (atomic), so a reader sees the tree whole or not at all.
        folder = self.locate(key)
        trash = folder.parent / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with open(self.locate(key) / _LOCK_FILE, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_storage(root: str | Path) -> Storage:
    """The ``Storage`` for a registry root: ``S3Storage`` for ``s3://bucket/prefix``, else a folder."""
    text = str(root)
    if text.startswith("s3://"):
        from lorafleet.registry.s3 import S3Storage

        return S3Storage(text)
    if "://" in text:
        raise RegistryError(
            f"registry root {text!r}: only s3:// object stores are supported (or an S3-compatible store "
            "with conditional writes, such as MinIO, through AWS_ENDPOINT_URL), or a folder every node mounts"
        )
    return LocalStorage(root)


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
    tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
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


def local_folder(src: str | Path) -> Path | None:
    """``src`` as a Path if it is an existing local folder (what ``copy_in`` reads), else None."""
    path = Path(src).expanduser()
    return path if path.is_dir() else None


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries so a rename into it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename folder ``src`` to ``dst``; False if ``dst`` already exists (another writer won)."""
    try:
        # POSIX rename refuses to replace a non-empty folder; version folders always hold
        # lorafleet.json, so a taken version number surfaces here as EEXIST/ENOTEMPTY.
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or isinstance(exc, FileExistsError):
            return False
        raise
    return True


# ------------------------------------------------------------------------------------------
# sha256 of local files: the one checksum routine, for the registry and for serving's copies.
# ------------------------------------------------------------------------------------------


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
    """The ``files`` map of a version's metadata; ``error`` if it has none."""
    files = metadata.get("files")
    if not isinstance(files, dict) or not files:
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

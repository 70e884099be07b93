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
* ``hash_files`` / ``verify_files`` are the sha256 checks on write and on load (locally with
  ``integrity.py``'s routines).

Which backend a root gets is ``backends.open_storage``; a checked local copy of a version from
either is ``copies.copy_verified``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, ContextManager, Protocol

from lorafleet.registry._constants import TMP_PREFIX
from lorafleet.registry.errors import RegistryError
from lorafleet.registry.integrity import sha256_file, verify_folder

try:  # POSIX only; without it alias updates are merely atomic, not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LocalStorage", "Storage", "local_folder"]

_TRASH_PREFIX = ".trash-"
_LOCK_FILE = ".aliases.lock"


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

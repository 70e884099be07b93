"""A serving replica's private adapter copies: made, checked, bounded and cleaned up.

The replica copies a registry version into a private cache and checks every file's sha256 against
the registry metadata *on the copy*, then gives vLLM the copy (``copy_verified``): what vLLM reads is
what was checked, and a later change or removal in the registry cannot reach a loaded adapter.
``CopyCache`` bounds the copies per replica (Serve's LRU evictions first); a replica that dies
without cleaning up has its cache removed by the next replica (``remove_orphan_caches``).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from lorafleet.registry import Entry, RegistryError
from lorafleet.registry import copy_verified as registry_copy_verified

__all__ = ["CACHE_PREFIX", "AdapterIntegrityError", "CopyCache", "copy_verified", "remove_orphan_caches"]

CACHE_PREFIX = "lorafleet-lora-"  # + "<pid>-<random>": one private cache folder per replica process


class AdapterIntegrityError(RegistryError):
    """An adapter's files do not match the sha256 sums recorded when it was registered."""


def copy_verified(entry: Entry, cache_root: Path, dest_name: str | None = None) -> Path:
    """The registry's ``copy_verified`` (a checked private copy, folder or object store), raising
    :class:`AdapterIntegrityError` when a file does not match."""
    return registry_copy_verified(entry, cache_root, dest_name, error=AdapterIntegrityError)


class CopyCache:
    """A replica's private adapter copies (``<root>/<name>@<version>``), at most ``limit`` of them.

    ``added`` records a copy as held by Serve's LRU; ``released`` (Serve's LRU dropped it) makes it
    the first to delete. Past ``limit``, released copies go first (the earliest released first); if
    none is released (Serve never said), the least recently loaded goes. Deleting a copy also tells
    the caller which refs to forget (``on_drop``), so their next load copies and checks them again.

    Args:
        root: The private cache folder.
        limit: Copies kept, e.g. ``2 * max_loras``: Serve's LRU holds ``max_loras``, and a few just
            released stay for requests already past the LRU (vLLM may re-read a copy it evicted).
        on_drop: Called with each deleted ref.
    """

    def __init__(self, root: Path, limit: int, on_drop: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.limit = max(1, limit)
        self.on_drop = on_drop
        self._order: OrderedDict[str, str | None] = OrderedDict()  # ref -> token while held, None released
        self._lock = threading.Lock()  # loads run in threads, Serve's release in an executor

    def refs(self) -> list[str]:
        """The refs with a copy, first to delete first."""
        with self._lock:
            return list(self._order)

    def added(self, ref: str) -> str:
        """Record a fresh copy of ``ref`` (held by Serve's LRU); returns its token for ``released``."""
        token = uuid.uuid4().hex
        with self._lock:
            self._order[ref] = token
            self._order.move_to_end(ref)
            dropped = self._prune(keep=ref)
        self._forget(dropped)
        return token

    def released(self, ref: str, token: str) -> None:
        """Serve's LRU dropped the copy loaded with ``token`` (stale tokens are ignored)."""
        with self._lock:
            if self._order.get(ref) != token:
                return  # a later load of the same ref, or already deleted
            self._order[ref] = None
            self._order.move_to_end(ref)
            dropped = self._prune(keep=None)
        self._forget(dropped)

    def _prune(self, keep: str | None) -> list[str]:
        dropped = []
        while len(self._order) > self.limit:
            candidates = [r for r in self._order if r != keep]
            victim = next((r for r in candidates if self._order[r] is None), candidates[0])
            del self._order[victim]
            shutil.rmtree(self.root / victim, ignore_errors=True)  # ours: inside the private cache
            dropped.append(victim)
        return dropped

    def _forget(self, refs: list[str]) -> None:
        if self.on_drop is not None:
            for ref in refs:
                self.on_drop(ref)


def remove_orphan_caches(tmp: Path) -> None:
    """Delete ``lorafleet-lora-<pid>-*`` folders whose process no longer exists on this machine."""
    for d in tmp.glob(f"{CACHE_PREFIX}*-*"):
        pid = d.name[len(CACHE_PREFIX):].split("-", 1)[0]
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

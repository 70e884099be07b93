"""The registry as serving reads it: versions remembered for good, aliases read on every lookup.

A registered version never changes (its files and ``lorafleet.json`` are published whole, and the
replicas already keep a loaded ``name@version`` for as long as their LRU holds it), so the entry of
a version, and whatever the catalog derives from it (:meth:`VersionCache.memo`), is read once. What
does change is which version a name or an alias means: ``promote`` rewrites ``aliases.json``. So a
lookup by name or alias reads that one small file, on every request (not on a timer: a promotion is
what the very next request answers with, as before), and a lookup by exact version reads that
version's ``lorafleet.json`` (it is still there, and still the same version). One storage call per
lookup on a warm cache; anything the cache cannot answer (an unknown version, a name without a
``live`` alias, a removed version) goes to ``Registry.resolve``, whose answers and errors stay the
registry's own.

Not on the event loop: ``serving.catalog`` calls this from a worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from lorafleet.registry import ALIASES_FILE, LIVE, METADATA_FILE, Entry, Registry, RegistryError, parse_ref
from lorafleet.registry.layout import load_entry, name_key, read_aliases_at
from lorafleet.registry.refs import is_version

__all__ = ["VersionCache"]


class VersionCache:
    """``Registry.resolve`` with exact versions remembered (see the module docstring).

    Args:
        registry: The registry to read; its ``storage`` is looked up on every call (tests swap it).
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._known: dict[tuple[str, str], tuple[Entry, dict[str, Any]]] = {}
        self._checked: set[str] = set()  # names whose folder key passed name_key (inside the root)
        self._lock = threading.Lock()  # lookups run on worker threads

    def lookup(self, ref: str, *, fresh_aliases: bool = False) -> Entry:
        """The entry ``ref`` (``name``, ``name@3``, ``name@alias``) names, as ``Registry.resolve`` gives it.

        Args:
            ref: A registry reference.
            fresh_aliases: Also re-read the aliases for an exact version (its ``aliases`` tags; a
                lookup by name or alias always has them fresh).

        Raises:
            RegistryError / ArtifactNotFoundError: As ``Registry.resolve``.
        """
        name, selector = parse_ref(ref)
        if name not in self._checked:
            name_key(self.registry.storage, name)  # RegistryError if it escapes the root
            self._checked.add(name)
        if selector is not None and selector.isdigit():
            entry = self._exact(name, selector)
            if entry is not None and fresh_aliases:
                entry = self._tagged(entry, self._aliases(name))
        else:
            aliases = self._aliases(name)
            version = aliases.get(selector or LIVE)
            entry = self._by_alias(name, version, aliases) if version and is_version(version) else None
        if entry is None:  # not remembered, or not answerable here: the registry decides (and words the error)
            entry = self._remember(self.registry.resolve(ref))
        return entry

    def memo(self, entry: Entry) -> dict[str, Any]:
        """A dict kept with ``entry``'s version for as long as it is remembered (derived facts)."""
        known = self._known.get((entry.name, entry.version))
        return known[1] if known is not None and known[0].metadata is entry.metadata else {}

    def names(self) -> list[str]:
        """Every folder directly under the root, sorted (one storage call; not all are artifacts)."""
        return sorted(self.registry.storage.list_dirs(""))

    # ----- internals ------------------------------------------------------------------------

    def _aliases(self, name: str) -> dict[str, str]:
        return read_aliases_at(self.registry.storage, f"{name}/{ALIASES_FILE}")

    def _exact(self, name: str, version: str) -> Entry | None:
        """The remembered entry of ``name@version`` if its metadata is still the same (one read)."""
        known = self._known.get((name, version))
        if known is None:
            return None
        try:
            metadata = self.registry.storage.read_json(f"{name}/{version}/{METADATA_FILE}")
        except (FileNotFoundError, ValueError):
            metadata = None
        if metadata != known[0].metadata:  # removed, or removed and its number registered again
            self._forget(name, version)
            return None
        return known[0]

    def _by_alias(self, name: str, version: str, aliases: dict[str, str]) -> Entry | None:
        known = self._known.get((name, version))
        if known is not None:
            return self._tagged(known[0], aliases)
        try:
            return self._remember(load_entry(self.registry.storage, name, version, aliases))
        except (FileNotFoundError, RegistryError):  # gone, or unreadable: let the registry say so
            return None

    def _tagged(self, entry: Entry, aliases: dict[str, str]) -> Entry:
        """``entry`` with the aliases that point at it now (remembered with them)."""
        tags = tuple(sorted(a for a, v in aliases.items() if v == entry.version))
        if tags == entry.aliases:
            return entry
        entry = replace(entry, aliases=tags)
        with self._lock:
            known = self._known.get((entry.name, entry.version))
            if known is not None and known[0].metadata is entry.metadata:
                self._known[(entry.name, entry.version)] = (entry, known[1])
        return entry

    def _remember(self, entry: Entry) -> Entry:
        """Keep ``entry``; the same version read again keeps what was derived from it (its memo)."""
        key = (entry.name, entry.version)
        with self._lock:
            known = self._known.get(key)
            same = known is not None and known[0].metadata == entry.metadata
            self._known[key] = (entry, known[1] if same else {})
        return entry

    def _forget(self, name: str, version: str) -> None:
        with self._lock:
            self._known.pop((name, version), None)

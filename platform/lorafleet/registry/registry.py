"""The artifact registry: named, versioned training artifacts behind a ``Storage``.

A finished run registers its artifact (a peft LoRA adapter folder or a full Hugging Face
model folder) as the next version of a name (layout: ``layout.py``); serving loads adapters
from here by name, possibly from another process while a writer registers or promotes.

Readers never see a half-written version: it is staged under a hidden ``.tmp-<uuid>`` key and
appears with one ``Storage.publish``, which refuses to replace a taken version, so concurrent
writers get distinct numbers. Removal makes a version vanish at once, then deletes it.
This module makes no filesystem call: ``storage.py`` (``LocalStorage``) does, and ``s3.py``
(``S3Storage``) is the object-store backend for an ``s3://bucket/prefix`` root (``backends.py``
picks one).

Example:
    >>> reg = Registry("./.lorafleet/registry")
    >>> entry = reg.register("sst2-lora", "runs/abc/adapter", {"base_model": "tiny"})
    >>> reg.resolve("sst2-lora").ref
    'sst2-lora@1'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.registry._constants import ALIASES_FILE, METADATA_FILE
from lorafleet.registry.backends import open_storage
from lorafleet.registry.copies import copy_verified
from lorafleet.registry.errors import ArtifactNotFoundError, LiveVersionError, RegistryError
from lorafleet.registry.integrity import checksums
from lorafleet.registry.layout import (
    Entry,
    load_entry,
    name_key,
    read_aliases,
    version_key,
    version_numbers,
)
from lorafleet.registry.refs import (
    LIVE,
    parse_ref,
    validate_alias,
    validate_name,
    validate_selector,
)
from lorafleet.registry.publish import check_inputs, stage_and_publish
from lorafleet.registry.storage import Storage

__all__ = ["Registry"]

class Registry:
    """A versioned artifact store.

    Args:
        root: Registry folder, e.g. ``<home>/registry``, or ``s3://bucket/prefix``. A folder is
            created on the first write, so pointing a reader at a registry that does not exist yet
            is not an error (a bucket must exist).
        storage: Where the files live; by default ``open_storage(root)`` (backends.py).
    """

    def __init__(self, root: str | Path, storage: Storage | None = None) -> None:
        self.root: Path | str = str(root).rstrip("/") if "://" in str(root) else Path(root).expanduser()
        self.storage: Storage = storage if storage is not None else open_storage(self.root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ----- reading ----------------------------------------------------------------------

    def _version_strings(self, name: str) -> set[str]:
        return {str(n) for n in version_numbers(self.storage, name)}

    def _entries(self, name: str) -> list[Entry]:
        """All readable versions of ``name`` in numeric order; broken ones are skipped."""
        aliases = read_aliases(self.storage, name)
        entries = []
        for number in version_numbers(self.storage, name):
            try:
                entries.append(load_entry(self.storage, name, str(number), aliases))
            except (RegistryError, FileNotFoundError):
                # Junk (unreadable metadata, symlink out of root) or removed meanwhile.
                continue
        return entries

    def names(self) -> list[str]:
        """Sorted names that have at least one version."""
        found = []
        for child in self.storage.list_dirs(""):
            try:
                validate_name(child)
                if version_numbers(self.storage, child):
                    found.append(child)
            except RegistryError:
                continue  # hidden, badly named or escaping folders are not artifacts
        return sorted(found)

    def list(self, name: str | None = None) -> list[Entry]:
        """List registered versions.

        Args:
            name: Only this artifact; None lists every artifact.

        Returns:
            Entries sorted by name, then numeric version. An unknown ``name`` gives [].

        Raises:
            RegistryError: If ``name`` is not a valid name.
        """
        names = [validate_name(name)] if name is not None else self.names()
        return [entry for n in names for entry in self._entries(n)]

    def _get(self, name: str, selector: str | None) -> Entry:
        """Find one entry by version, alias, or (selector None) live-else-latest."""
        numbers = version_numbers(self.storage, name)
        if not numbers:
            available = self.names()
            raise ArtifactNotFoundError(
                f"artifact {name!r} not found in {self.root}; available: {available}"
                + ("" if available else " (register one first)")
            )
        aliases = read_aliases(self.storage, name)
        versions = [str(n) for n in numbers]
        if selector is None:
            version = aliases.get(LIVE, versions[-1])
            origin = f"alias {LIVE!r}"
        elif selector.isdigit():
            version, origin = selector, None
        elif selector in aliases:
            version, origin = aliases[selector], f"alias {selector!r}"
        else:
            raise ArtifactNotFoundError(
                f"alias {selector!r} of {name!r} not found; aliases: {sorted(aliases)}, "
                f"versions: {versions} (use '{name}@<version>' or promote a version first)"
            )
        if version not in versions:
            what = f"version {version!r} of {name!r}"
            if origin:
                what += f" (pointed to by {origin})"
            raise ArtifactNotFoundError(
                f"{what} not found; available versions: {versions}"
                + (f", aliases: {aliases}" if aliases else "")
                + (f"; run promote to repoint {origin}" if origin else "")
            )
        try:
            return load_entry(self.storage, name, version, aliases)
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"'{name}@{version}' was removed while being read; try again"
            ) from None

    def resolve(self, ref: str) -> Entry:
        """Find the entry a reference names.

        Args:
            ref: ``"name"`` (the version 'live' points to, or the latest if there is no
                'live' alias), ``"name@3"`` (version 3) or ``"name@canary"`` (an alias).

        Returns:
            The matching entry.

        Raises:
            RegistryError: If the reference is malformed.
            ArtifactNotFoundError: If the name is unknown (the message lists available names)
                or the version/alias is unknown (it lists the available versions and aliases).
        """
        name, selector = parse_ref(ref)
        return self._get(name, selector)

    def verify(self, entry: Entry) -> None:
        """Check an entry's files against the sha256 sums in its metadata.

        Args:
            entry: Entry from ``list``/``resolve``/``register``.

        Raises:
            RegistryError: Naming the first missing or modified file, or a file that is
                present but not listed (it could change what a loader picks up).
        """
        key = version_key(self.storage, entry.name, entry.version)
        try:
            metadata = self.storage.read_json(f"{key}/{METADATA_FILE}")
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{entry.ref} no longer exists in {self.root}") from None
        self.storage.verify_files(key, checksums(metadata, entry.ref), entry.ref)

    def local_path(self, entry: Entry) -> Path:
        """A local folder with ``entry``'s files, checked against their sha256 sums: the version
        folder itself in a folder registry, a fresh private copy (a temporary folder) of an
        object-store one. For loaders that need files (``lorafleet eval``, prompts, compare)."""
        if isinstance(entry.path, Path):
            self.verify(entry)
            return entry.path
        import tempfile

        return copy_verified(entry, Path(tempfile.mkdtemp(prefix="lorafleet-artifact-")), entry.ref)

    # ----- writing ----------------------------------------------------------------------

    def register(
        self,
        name: str,
        src_dir: str | Path,
        metadata: dict[str, Any],
        *,
        promote: bool = False,
    ) -> Entry:
        """Copy an artifact folder in as the next version of ``name``; returns the new entry.

        The copy is staged under a hidden ``.tmp-<uuid>`` key, hashed, made durable and then
        published as the next free version number, so readers never see it half-written and
        concurrent writers get distinct versions.

        Args:
            name: Artifact name (see ``validate_name``).
            src_dir: Folder to copy (sub-folders allowed; symlinks are followed). A top-level
                ``lorafleet.json`` in it is replaced by a fresh one.
            metadata: JSON-serialisable dict (base_model, task, method, metrics, config, ...);
                name, version, created, files and size_bytes are the registry's.
            promote: Point 'live' at the new version ('live' is set anyway when ``name`` has none).

        Raises RegistryError for an invalid name, a ``src_dir`` that is not a folder, or
        metadata that is not a JSON-serialisable dict.
        """
        src, meta = check_inputs(name, src_dir, metadata)
        folder = name_key(self.storage, name)
        self.storage.make_dirs(folder)
        version = stage_and_publish(self.storage, name, src, meta)
        with self.storage.lock(folder):
            aliases = read_aliases(self.storage, name)
            # "Has no live" rather than "is version 1": also covers a name whose live
            # version was force-removed.
            if promote or aliases.get(LIVE) not in self._version_strings(name):
                aliases[LIVE] = version
                self.storage.write_json(f"{folder}/{ALIASES_FILE}", aliases)
        return load_entry(self.storage, name, version, aliases)

    def promote(self, name: str, version: str, alias: str = LIVE) -> Entry:
        """Point ``alias`` of ``name`` at ``version``.

        Args:
            name: Artifact name.
            version: Version number, or an existing alias to copy (e.g. promote the
                version 'canary' points to to 'live').
            alias: Alias to move; not all digits.

        Returns:
            The promoted entry, with its updated aliases.

        Raises:
            RegistryError: If the name, version or alias is invalid or unknown.
        """
        validate_name(name)
        validate_alias(alias)
        folder = name_key(self.storage, name)
        target = self._get(name, validate_selector(version))
        with self.storage.lock(folder):
            aliases = read_aliases(self.storage, name)
            aliases[alias] = target.version
            self.storage.write_json(f"{folder}/{ALIASES_FILE}", aliases)
        return load_entry(self.storage, name, target.version, aliases)

    def _live_version(self, name: str) -> str | None:
        """'live' if it points at a version, else the latest (None without versions): what
        ``resolve(name)`` gives, or would once a dangling 'live' (removed by hand) is repaired."""
        versions = self._version_strings(name)
        live = read_aliases(self.storage, name).get(LIVE)
        if live in versions:
            return live
        return max(versions, key=int) if versions else None

    def remove(
        self, name: str, version: str | None = None, *, force: bool = False
    ) -> list[Entry]:
        """Remove one version (number or alias), or every version and the aliases when ``version``
        is None; returns the removed entries.

        The live version (``_live_version``: what serving answers ``name`` with) goes only with
        ``force`` (else LiveVersionError), also as part of the whole artifact; an unknown name or
        version is ArtifactNotFoundError. Aliases of a removed version are dropped, so
        ``resolve(name)`` then falls back to the latest remaining version."""
        validate_name(name)
        folder = name_key(self.storage, name)
        if version is None:
            live = self._live_version(name)
            if live is None:
                self._get(name, None)  # raises "not found; available: ..."
            removed = self.list(name)
            if not force:
                others = sorted(self._version_strings(name) - {live}, key=int)
                raise LiveVersionError(
                    f"removing every version of {name!r} would remove {name}@{live}, the live "
                    f"version (what {name!r} resolves to, in serving too); pass force=True "
                    "to remove it anyway", name=name, live=live, others=others,
                )
            # One step takes the whole name out of sight, aliases included.
            self.storage.delete_tree(folder)
            return removed

        target = self._get(name, validate_selector(version))
        with self.storage.lock(folder):
            live = self._live_version(name)
            others = sorted(self._version_strings(name) - {target.version}, key=int)
            if live == target.version and not force:
                hint = (f"promote another version first (e.g. promote({name!r}, {others[-1]!r})) or "
                        if others else "it is the only version; ")
                raise LiveVersionError(
                    f"{target.ref} is the live version (what {name!r} resolves to, in serving too); "
                    f"{hint}pass force=True to remove it anyway",
                    name=name, live=target.version, others=others,
                )
            aliases = read_aliases(self.storage, name)
            self.storage.delete_tree(version_key(self.storage, name, target.version))
            kept = {a: v for a, v in aliases.items() if v != target.version}
            if kept != aliases:
                self.storage.write_json(f"{folder}/{ALIASES_FILE}", kept)
        return [target]

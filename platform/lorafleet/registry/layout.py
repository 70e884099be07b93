"""The registry's layout: which keys hold what, and reading them back into ``Entry`` objects.

::

    <root>/<name>/<version>/        version = "1", "2", ... (next integer)
        <artifact files>            copied from the source folder, sub-folders allowed
        lorafleet.json              caller's metadata + name, version, created, files, size_bytes
    <root>/<name>/aliases.json      {"live": "2"}

A version counts only once its ``lorafleet.json`` exists (it is published last), and every
hidden entry (leading '.', e.g. ``.tmp-<uuid>`` staging) is invisible. The same layout holds
under a local folder or an object-store prefix: these functions speak only ``Storage``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.registry._constants import ALIASES_FILE, METADATA_FILE
from lorafleet.registry.errors import RegistryError
from lorafleet.registry.metadata import ArtifactMetadata
from lorafleet.registry.refs import is_version, validate_name, validate_version

if TYPE_CHECKING:
    from lorafleet.registry.storage import Storage

__all__ = [
    "REGISTRY_KEYS",
    "Entry",
    "caller_metadata",
    "load_entry",
    "name_key",
    "read_aliases",
    "read_aliases_at",
    "version_key",
    "version_numbers",
]

# Keys the registry writes into lorafleet.json; they win over the caller's values so the
# metadata always describes the folder it sits in.
REGISTRY_KEYS = ("name", "version", "created", "files", "size_bytes")


@dataclass(frozen=True)
class Entry:
    """One registered version of an artifact.

    Attributes:
        name: Artifact name, e.g. ``"sst2-lora"``.
        version: Version number as a string, e.g. ``"2"``.
        path: The version folder (pass it to a loader as is), or its URI in an object-store
            registry (``Registry.local_path`` gives a checked local copy).
        metadata: Parsed ``lorafleet.json``, as stored (``meta`` is its typed view).
        aliases: Aliases pointing at this version, sorted, e.g. ``("live",)``.
        storage: The registry's storage, for reading the version's files (``read_json``).
    """

    name: str
    version: str
    path: Path | str
    # Excluded from hashing/equality: a dict is unhashable, and name + version + path
    # already identify the entry.
    metadata: dict[str, Any] = field(hash=False, compare=False, repr=False)
    aliases: tuple[str, ...] = ()
    storage: Storage | None = field(default=None, hash=False, compare=False, repr=False)

    @property
    def ref(self) -> str:
        """The canonical reference ``"name@version"``."""
        return f"{self.name}@{self.version}"

    @cached_property
    def meta(self) -> ArtifactMetadata:
        """The typed view of ``metadata`` (what the artifact is, how it scored, its config)."""
        return ArtifactMetadata.read(self.metadata)

    @property
    def key(self) -> str:
        """The version folder's key in its storage."""
        return f"{self.name}/{self.version}"

    def read_json(self, rel: str) -> Any:
        """Parse the version's JSON file ``rel`` (e.g. adapter_config.json) wherever it is stored;
        FileNotFoundError if absent, ValueError if malformed."""
        if self.storage is None:
            return json.loads((Path(self.path) / rel).read_text(encoding="utf-8"))
        return self.storage.read_json(f"{self.key}/{rel}")


def name_key(storage: Storage, name: str) -> str:
    """The key of ``name``'s folder, validated and checked to stay inside the root."""
    key = validate_name(name)
    storage.check_inside(key)
    return key


def version_key(storage: Storage, name: str, version: str) -> str:
    """The key of a version folder, validated and checked to stay inside the root."""
    key = f"{name_key(storage, name)}/{validate_version(version)}"
    storage.check_inside(key)
    return key


def read_aliases(storage: Storage, name: str) -> dict[str, str]:
    """Read ``aliases.json`` of ``name``; {} if absent."""
    return read_aliases_at(storage, f"{name_key(storage, name)}/{ALIASES_FILE}")


def read_aliases_at(storage: Storage, key: str) -> dict[str, str]:
    """Read the aliases file at ``key`` (a name's, checked by ``name_key`` beforehand: one storage
    call, what serving's catalog pays per request); {} if absent."""
    try:
        data = storage.read_json(key)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise RegistryError(
            f"{storage.locate(key)} is not valid JSON ({exc}); fix it or delete it and run "
            "promote again"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise RegistryError(
            f"{storage.locate(key)} must map alias names to version strings, e.g. "
            "{\"live\": \"2\"}; fix it or delete it and run promote again"
        )
    return data


def version_numbers(storage: Storage, name: str, *, valid_only: bool = True) -> list[int]:
    """Sorted version numbers of ``name``; with valid_only, only folders holding metadata."""
    key = name_key(storage, name)
    numbers = []
    for child in storage.list_dirs(key):
        if not is_version(child):
            continue  # junk or hidden (.tmp-*, .trash-*) folders
        if valid_only and not storage.is_file(f"{key}/{child}/{METADATA_FILE}"):
            continue  # not a finished version (e.g. copied in by hand)
        numbers.append(int(child))
    return sorted(numbers)


def load_entry(storage: Storage, name: str, version: str, aliases: dict[str, str]) -> Entry:
    """Build the Entry for an existing version; FileNotFoundError if it is gone."""
    key = version_key(storage, name, version)
    meta_key = f"{key}/{METADATA_FILE}"
    fix = f"re-register the artifact or remove '{name}@{version}'"
    try:
        metadata = storage.read_json(meta_key)
    except ValueError as exc:
        raise RegistryError(f"{storage.locate(meta_key)} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(metadata, dict):
        raise RegistryError(f"{storage.locate(meta_key)} must hold a JSON object; {fix}")
    tags = tuple(sorted(a for a, v in aliases.items() if v == version))
    return Entry(
        name=name, version=version, path=storage.locate(key), metadata=metadata, aliases=tags,
        storage=storage,
    )


def caller_metadata(name: str, metadata: Any) -> dict[str, Any]:
    """The caller's part of a new version's lorafleet.json: a copy without ``REGISTRY_KEYS``.

    Raises:
        RegistryError: If ``metadata`` is not a dict or not JSON-serialisable.
    """
    if not isinstance(metadata, dict):
        raise RegistryError(
            f"metadata for {name!r} must be a dict, got {type(metadata).__name__}"
        )
    meta = {k: v for k, v in metadata.items() if k not in REGISTRY_KEYS}
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise RegistryError(
            f"metadata for {name!r} is not JSON-serialisable ({exc}); convert values to "
            "str/int/float/bool/list/dict (e.g. Path -> str, tensors -> float)"
        ) from None
    return meta

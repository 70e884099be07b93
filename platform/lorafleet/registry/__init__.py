"""The artifact registry: named, versioned training artifacts (``name``, ``name@3``, ``name@live``).

``Registry`` (registry.py) holds the logic and speaks only the ``Storage`` protocol
(storage.py), whose ``LocalStorage`` is the one home of the registry's filesystem calls
(``S3Storage`` in s3.py: the same layout under ``s3://bucket/prefix``; ``open_storage`` in
backends.py picks one); the layout and ``Entry`` are in layout.py, the typed metadata
(``ArtifactMetadata``, ``Entry.meta``) in metadata.py, name/version/alias/reference
checks in refs.py, the reserved file names in _constants.py. ``verify_folder`` / ``sha256_file``
(integrity.py) are the one sha256 check, and ``copy_verified`` (copies.py) a checked local copy
of a version, shared with serving's copies.

Layers, each importing only those below it: _constants, errors, refs, metadata -> integrity -> storage, s3
-> layout, backends -> copies, publish (staging a new version) -> registry.
Errors (errors.py): ``RegistryError``; ``ArtifactNotFoundError`` (unknown or removed name,
version or alias: serving's 404) and ``LiveVersionError`` (a removal of the live version
without ``force``) are its subclasses.
"""

from lorafleet.registry._constants import ALIASES_FILE, METADATA_FILE
from lorafleet.registry.backends import open_storage
from lorafleet.registry.copies import copy_verified
from lorafleet.registry.errors import ArtifactNotFoundError, LiveVersionError, RegistryError
from lorafleet.registry.integrity import checksums, sha256_file, verify_folder
from lorafleet.registry.layout import Entry
from lorafleet.registry.metadata import ArtifactMetadata, SweepOrigin
from lorafleet.registry.refs import LIVE, parse_ref, validate_alias, validate_name
from lorafleet.registry.registry import Registry
from lorafleet.registry.storage import LocalStorage, Storage

__all__ = [
    "ALIASES_FILE",
    "LIVE",
    "ArtifactMetadata",
    "ArtifactNotFoundError",
    "METADATA_FILE",
    "Entry",
    "LiveVersionError",
    "LocalStorage",
    "Registry",
    "RegistryError",
    "Storage",
    "SweepOrigin",
    "checksums",
    "copy_verified",
    "open_storage",
    "parse_ref",
    "sha256_file",
    "validate_alias",
    "validate_name",
    "verify_folder",
]

"""The artifact registry: named, versioned training artifacts (``name``, ``name@3``, ``name@live``).

``Registry`` (registry.py) holds the logic and speaks only the ``Storage`` protocol
(storage.py), whose ``LocalStorage`` is the one home of the registry's filesystem calls
(``S3Storage`` in s3.py: the same layout under ``s3://bucket/prefix``); the
layout and ``Entry`` are in layout.py, name/version/alias/reference checks in refs.py.
``verify_folder`` / ``sha256_file`` are the one sha256 check, shared with serving's copies.
Errors (errors.py): ``RegistryError``; ``ArtifactNotFoundError`` (unknown or removed name,
version or alias: serving's 404) and ``LiveVersionError`` (a removal of the live version
without ``force``) are its subclasses.
"""

from lorafleet.registry.errors import ArtifactNotFoundError, LiveVersionError, RegistryError
from lorafleet.registry.layout import ALIASES_FILE, METADATA_FILE, Entry
from lorafleet.registry.refs import LIVE, parse_ref, validate_alias, validate_name
from lorafleet.registry.registry import Registry
from lorafleet.registry.storage import (
    LocalStorage,
    Storage,
    checksums,
    copy_verified,
    open_storage,
    sha256_file,
    verify_folder,
)

__all__ = [
    "ALIASES_FILE",
    "LIVE",
    "ArtifactNotFoundError",
    "METADATA_FILE",
    "Entry",
    "LiveVersionError",
    "LocalStorage",
    "Registry",
    "RegistryError",
    "Storage",
    "checksums",
    "copy_verified",
    "open_storage",
    "parse_ref",
    "sha256_file",
    "validate_alias",
    "validate_name",
    "verify_folder",
]

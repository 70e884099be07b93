"""Which ``Storage`` a registry root opens: ``S3Storage`` (s3.py) for ``s3://bucket/prefix``,
``LocalStorage`` (storage.py) for a folder. The one module that knows both backends."""

from __future__ import annotations

from pathlib import Path

from lorafleet.registry.errors import RegistryError
from lorafleet.registry.s3 import S3Storage
from lorafleet.registry.storage import LocalStorage, Storage

__all__ = ["open_storage"]


def open_storage(root: str | Path) -> Storage:
    """The ``Storage`` for a registry root: ``S3Storage`` for ``s3://bucket/prefix``, else a folder."""
    text = str(root)
    if text.startswith("s3://"):
        return S3Storage(text)
    if "://" in text:
        raise RegistryError(
            f"registry root {text!r}: only s3:// object stores are supported (or an S3-compatible store "
            "with conditional writes, such as MinIO, through AWS_ENDPOINT_URL), or a folder every node mounts"
        )
    return LocalStorage(root)

"""``S3Storage``: the registry's ``Storage`` in an S3 bucket (``s3://bucket/prefix``), through boto3.

The layout is the local one, with keys for paths (``<prefix>/<name>/<version>/lorafleet.json``).
What a folder rename gives locally, S3's conditional writes give here (``IfNoneMatch="*"``: create
the object only if the key is free; S3 has had them since 2024, MinIO and moto too):

* ``publish`` first claims the version with a create-only ``.claim`` object (a second writer of the
  same number gets False and tries the next one, without touching the first one's files), copies
  the staged objects over, then writes ``lorafleet.json`` last. Readers ignore a version without
  it, so a version appears whole or not at all; a writer that dies after its claim leaves a number
  that stays taken and invisible.
* ``delete_tree`` deletes ``lorafleet.json`` first, so readers stop seeing the version at once.
* ``lock`` is a create-only lock object; one left by a dead writer is broken after ``LOCK_STALE_S``.

Credentials and the endpoint come from boto3's usual places (``AWS_*`` variables, ``~/.aws``,
instance roles); ``AWS_ENDPOINT_URL`` points it at an S3-compatible store (MinIO, moto's server).
Needs the ``s3`` extra (``pip install lorafleet[s3]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorafleet.registry._constants import METADATA_FILE
from lorafleet.registry.errors import RegistryError

__all__ = ["S3Storage", "LOCK_STALE_S"]

CLAIM = ".claim"  # create-only marker of a taken version number (publish)
LOCK_OBJECT = ".aliases.lock"
LOCK_STALE_S = 60.0  # a lock older than this is a dead writer's: aliases are rewritten in milliseconds
_LOCK_WAIT_S = 120.0
_CHUNK = 1 << 20


def _split(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RegistryError(f"registry root {uri!r} names no bucket; use s3://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


class S3Storage:
    """``Storage`` (see storage.py) under ``s3://bucket/prefix``.

    Args:
        root: ``s3://bucket[/prefix]``; the bucket must exist.
    """

    def __init__(self, root: str) -> None:
        self.uri = root.rstrip("/")
        self.bucket, self.prefix = _split(self.uri)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    def __getstate__(self) -> dict[str, Any]:  # boto3 clients do not pickle; make a new one there
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError:
                raise RegistryError(
                    f"the registry at {self.uri} needs boto3: pip install 'lorafleet[s3]'"
                ) from None
            self._client = boto3.client("s3")
        return self._client

    # ----- keys -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check_inside(self, key: str) -> None:
        # No symlinks in a bucket; names and versions are validated, so only '..' could escape.
        if ".." in key.split("/"):
            raise RegistryError(f"refusing to use {self.locate(key)}: '..' in a registry key")

    def _objects(self, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(relative key, object summary) of every object under folder ``key``."""
        base = self._key(key) + "/" if self._key(key) else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base):], obj

    # ----- reading ----------------------------------------------------------------------------

    def list_dirs(self, key: str) -> list[str]:
        base = self._key(key) + "/" if self._key(key) else ""
        names = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names

    def is_file(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors() as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def _get(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._errors() as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(f"{self.locate(key)} not found") from None
            raise

    def read_json(self, key: str) -> Any:
        return json.loads(self._get(key).read())

    def copy_out(self, key: str, dst: Path) -> None:
        found = False
        for rel, _ in self._objects(key):
            found = True
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            body = self._get(f"{key}/{rel}")  # FileNotFoundError if removed mid-copy
            with open(target, "wb") as f:
                while chunk := body.read(_CHUNK):
                    f.write(chunk)
        if not found:
            raise FileNotFoundError(f"{self.locate(key)} not found")

    def _sha256(self, key: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        body = self._get(key)
        while chunk := body.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size

    def hash_files(self, key: str, *, exclude: Collection[str] = ()) -> tuple[dict[str, str], int]:
        # Hashes what the store holds (read back), not the local source: the upload is checked too.
        files: dict[str, str] = {}
        total = 0
        for rel, _ in sorted(self._objects(key)):
            if rel in exclude or rel == CLAIM:
                continue
            files[rel], size = self._sha256(f"{key}/{rel}")
            total += size
        return files, total

    def verify_files(self, key: str, files: Mapping[str, str], ref: str) -> None:
        present = {rel for rel, _ in self._objects(key)} - {METADATA_FILE, CLAIM}
        for rel, expected in sorted(files.items()):
            if rel not in present:
                raise RegistryError(f"{ref}: file {rel!r} is missing; re-register it")
            if self._sha256(f"{key}/{rel}")[0] != expected:
                raise RegistryError(f"{ref}: file {rel!r} does not match its sha256 (modified or corrupt); "
                                    "re-register it")
        extra = sorted(present - set(files))
        if extra:
            raise RegistryError(f"{ref}: file {extra[0]!r} is not in the registered file list; delete it "
                                "or re-register the artifact")

    # ----- writing ----------------------------------------------------------------------------

    def write_json(self, key: str, data: Any) -> None:
        # One PUT replaces an object whole: readers see the old or the new content.
        body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def _create(self, key: str, body: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
        except self._errors() as exc:
            if _status(exc) in (409, 412):  # 409: a concurrent conditional write of the same key
                return False
            raise
        return True

    def make_dirs(self, key: str) -> None:
        pass  # prefixes exist as soon as an object is under them

    def copy_in(self, src: Path, key: str, *, exclude: Collection[str] = ()) -> None:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):  # rglob + is_file follow symlinks
            rel = path.relative_to(src).as_posix()
            if rel.split("/", 1)[0] in exclude:
                continue
            self.client.upload_file(str(path), self.bucket, self._key(f"{key}/{rel}"))

    def publish(self, staged: str, final: str) -> bool:
        if not self._create(f"{final}/{CLAIM}", b""):
            return False  # another writer holds this version number
        for rel, _ in sorted(self._objects(staged)):
            if rel != METADATA_FILE:
                self.client.copy_object(Bucket=self.bucket, Key=self._key(f"{final}/{rel}"),
                                        CopySource={"Bucket": self.bucket, "Key": self._key(f"{staged}/{rel}")})
        metadata = self._get(f"{staged}/{METADATA_FILE}").read()
        self.client.put_object(Bucket=self.bucket, Key=self._key(f"{final}/{METADATA_FILE}"), Body=metadata)
        self._delete([f"{final}/{CLAIM}"])
        self.discard(staged)
        return True

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def discard(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self._delete([f"{key}/{rel}" for rel, _ in self._objects(key)])

    def delete_tree(self, key: str) -> None:
        # Metadata first (a version's, or every version's of a name): readers stop seeing it here.
        rels = [rel for rel, _ in self._objects(key)]
        self._delete([f"{key}/{rel}" for rel in rels if rel.rpartition("/")[2] == METADATA_FILE])
        self._delete([f"{key}/{rel}" for rel in rels if rel.rpartition("/")[2] != METADATA_FILE])

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        lock_key = f"{key}/{LOCK_OBJECT}"
        owner = f"{os.getpid()}-{uuid.uuid4().hex}".encode()
        deadline = time.monotonic() + _LOCK_WAIT_S
        while not self._create(lock_key, owner):
            self._break_if_stale(lock_key)
            if time.monotonic() > deadline:
                raise RegistryError(f"{self.locate(lock_key)} held for over {_LOCK_WAIT_S:.0f} s; if no "
                                    "writer is running, delete it")
            time.sleep(0.2)
        try:
            yield
        finally:
            self._delete([lock_key])

    def _break_if_stale(self, lock_key: str) -> None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(lock_key))
        except self._errors():
            return  # released meanwhile
        # The store's clock stamps the lock, ours judges it: a clock more than LOCK_STALE_S off would
        # break a live lock early (keep NTP on), so the bound is far above an alias update's time.
        if (datetime.now(timezone.utc) - head["LastModified"]).total_seconds() > LOCK_STALE_S:
            self._delete([lock_key])

    def _errors(self) -> type[Exception]:
        return self.client.exceptions.ClientError


def _status(exc: Exception) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0))

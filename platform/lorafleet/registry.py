"""The artifact registry: named, versioned training artifacts in one folder.

A finished run registers its artifact (a peft LoRA adapter folder or a full Hugging Face
model folder) under ``<root>/<name>/<version>/``; serving loads adapters from here by name,
possibly from another process while a writer registers or promotes. Layout::

    <root>/<name>/<version>/        version = "1", "2", ... (next integer)
        <artifact files>            copied from the source folder, sub-folders allowed
        lorafleet.json              caller's metadata + name, version, created, files, size_bytes
    <root>/<name>/aliases.json      {"live": "2"}

Readers never see a half-written version: a version is assembled in a hidden
``.tmp-<uuid>`` folder and appears with one ``os.rename``. Removal is the same move in
reverse (rename to ``.trash-<uuid>``, then delete), so a reader sees a version whole or not
at all. Every hidden entry (leading '.') is invisible to ``list`` and ``resolve``.

Only the local filesystem is supported for now. Every filesystem call lives in the
"filesystem primitives" section below, so an object-storage backend replaces that section
and leaves the registry logic alone.

Example:
    >>> reg = Registry("./.lorafleet/registry")
    >>> entry = reg.register("sst2-lora", "runs/abc/adapter", {"base_model": "tiny"})
    >>> reg.resolve("sst2-lora").ref
    'sst2-lora@1'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # POSIX only; without it alias updates are merely atomic, not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "METADATA_FILE",
    "LIVE",
    "Entry",
    "Registry",
    "RegistryError",
    "validate_name",
]

METADATA_FILE = "lorafleet.json"
ALIASES_FILE = "aliases.json"
LIVE = "live"

# Keys the registry writes into lorafleet.json; they win over the caller's values so the
# metadata always describes the folder it sits in.
_REGISTRY_KEYS = ("name", "version", "created", "files", "size_bytes")

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_LOCK_FILE = ".aliases.lock"
# Bound on rename retries; only reached if something keeps creating version folders.
_MAX_RENAME_TRIES = 1000
_HASH_CHUNK = 1 << 20


class RegistryError(ValueError):
    """A problem the user can fix; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One registered version of an artifact.

    Attributes:
        name: Artifact name, e.g. ``"sst2-lora"``.
        version: Version number as a string, e.g. ``"2"``.
        path: The version folder; pass it to the loader (peft / vLLM) as is.
        metadata: Parsed ``lorafleet.json``.
        aliases: Aliases pointing at this version, sorted, e.g. ``("live",)``.
    """

    name: str
    version: str
    path: Path
    # Excluded from hashing/equality: a dict is unhashable, and name + version + path
    # already identify the entry.
    metadata: dict[str, Any] = field(hash=False, compare=False, repr=False)
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The canonical reference ``"name@version"``."""
        return f"{self.name}@{self.version}"


def validate_name(name: str) -> str:
    """Check an artifact (or alias) name and return it unchanged.

    Names become folder names, so they are restricted to a safe alphabet.

    Args:
        name: Candidate name.

    Returns:
        ``name``, for chaining.

    Raises:
        RegistryError: If ``name`` is empty, longer than 64 characters, starts with '.',
            contains '..', a path separator or any character other than letters, digits,
            '.', '_' and '-'.
    """
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or name.startswith(".")
        or ".." in name
    ):
        raise RegistryError(
            f"invalid artifact name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with '.' (no path separators or '..')"
        )
    return name


def _validate_version(version: str | int) -> str:
    """Return the canonical version string ("007" -> "7") or raise RegistryError."""
    text = str(version)
    if not _VERSION_RE.fullmatch(text) or int(text) < 1:
        raise RegistryError(
            f"invalid version {text!r}: versions are positive integers such as '1' or '2'"
        )
    return str(int(text))


def _validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a usable alias name, else raise RegistryError."""
    if isinstance(alias, str) and alias.isdigit():
        # An all-digit alias would be indistinguishable from a version in "name@3".
        raise RegistryError(
            f"invalid alias {alias!r}: aliases must not be all digits (those are versions); "
            "use a word such as 'live' or 'canary'"
        )
    try:
        return validate_name(alias)
    except RegistryError:
        raise RegistryError(
            f"invalid alias {alias!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        ) from None


def _parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"name"`` / ``"name@selector"`` into (name, selector or None), validated."""
    if not isinstance(ref, str):
        raise RegistryError(f"invalid reference {ref!r}: expected 'name' or 'name@version'")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not selector:
        raise RegistryError(
            f"invalid reference {ref!r}: put a version or alias after '@', e.g. '{name}@1' "
            f"or '{name}@live', or leave '@' out for the live version"
        )
    return name, _validate_selector(selector)


def _validate_selector(selector: str | int) -> str:
    """Validate a version-or-alias selector; versions come back canonical."""
    text = str(selector)
    if text.isdigit():
        return _validate_version(text)
    return _validate_alias(text)


# --------------------------------------------------------------------------------------
# Filesystem primitives. Everything that touches storage is here.
# --------------------------------------------------------------------------------------


def _child_names(folder: Path, *, dirs_only: bool = True) -> list[str]:
    """Names in ``folder`` (folders only by default); [] if it does not exist."""
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if not dirs_only or e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_json(path: Path) -> Any:
    """Parse a JSON file; FileNotFoundError propagates, bad JSON becomes ValueError."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file + fsync + os.replace, so readers see old or new, never half."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
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


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new folder ``dst``, following symlinks, minus a top-level metadata file.

    A source's own lorafleet.json (e.g. when re-registering a registry version) is dropped
    because the registry writes a fresh one.
    """

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {METADATA_FILE} if Path(folder) == src else set()

    shutil.copytree(src, dst, symlinks=False, ignore=ignore)


def _hash_tree(folder: Path) -> tuple[dict[str, str], int]:
    """sha256 every file under ``folder`` (except lorafleet.json) and fsync it.

    Returns:
        ({posix relative path: sha256 hex}, total size in bytes).
    """
    files: dict[str, str] = {}
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == METADATA_FILE:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
            # Hashing already reads the file, so flush it to disk in the same pass.
            os.fsync(f.fileno())
        files[rel] = digest.hexdigest()
        total += path.stat().st_size
    return files, total


def _sha256_file(path: Path) -> str:
    """sha256 hex digest of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _list_files(folder: Path) -> set[str]:
    """Posix relative paths of all files under ``folder``."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


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


def _delete_tree(folder: Path, trash_parent: Path) -> None:
    """Remove ``folder``: first rename it out of sight (atomic), then delete the contents."""
    trash = trash_parent / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise alias read-modify-write between processes (advisory lock on POSIX)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(folder / _LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------


class Registry:
    """A versioned artifact store in a local folder.

    Args:
        root: Registry folder, e.g. ``<home>/registry``. Created on the first write, so
            pointing a reader at a registry that does not exist yet is not an error.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ----- paths ------------------------------------------------------------------------

    def _safe(self, path: Path) -> Path:
        """Return ``path`` if it resolves inside the root (symlinks included), else raise."""
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise RegistryError(
                f"refusing to use {path}: it resolves outside the registry root {root} "
                "(remove the symlink or fix the path)"
            )
        return path

    def _name_dir(self, name: str) -> Path:
        return self._safe(self.root / validate_name(name))

    def _version_dir(self, name: str, version: str) -> Path:
        return self._safe(self._name_dir(name) / _validate_version(version))

    # ----- reading ----------------------------------------------------------------------

    def _aliases(self, name: str) -> dict[str, str]:
        """Read ``aliases.json`` of ``name``; {} if absent."""
        path = self._name_dir(name) / ALIASES_FILE
        try:
            data = _read_json(path)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise RegistryError(
                f"{path} is not valid JSON ({exc}); fix it or delete it and run promote again"
            ) from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise RegistryError(
                f"{path} must map alias names to version strings, e.g. {{\"live\": \"2\"}}; "
                "fix it or delete it and run promote again"
            )
        return data

    def _version_numbers(self, name: str, *, valid_only: bool = True) -> list[int]:
        """Sorted version numbers of ``name``; with valid_only, only folders holding metadata."""
        name_dir = self._name_dir(name)
        numbers = []
        for child in _child_names(name_dir):
            if not _VERSION_RE.fullmatch(child) or child != str(int(child)) or child == "0":
                continue  # junk or hidden (.tmp-*, .trash-*) folders
            if valid_only and not (name_dir / child / METADATA_FILE).is_file():
                continue  # not a finished version (e.g. copied in by hand)
            numbers.append(int(child))
        return sorted(numbers)

    def _load(self, name: str, version: str, aliases: dict[str, str]) -> Entry:
        """Build the Entry for an existing version folder."""
        path = self._version_dir(name, version)
        meta_path = path / METADATA_FILE
        try:
            metadata = _read_json(meta_path)
        except ValueError as exc:
            raise RegistryError(
                f"{meta_path} is not valid JSON ({exc}); re-register the artifact or remove "
                f"'{name}@{version}'"
            ) from None
        if not isinstance(metadata, dict):
            raise RegistryError(
                f"{meta_path} must hold a JSON object; re-register the artifact or remove "
                f"'{name}@{version}'"
            )
        tags = tuple(sorted(a for a, v in aliases.items() if v == version))
        return Entry(name=name, version=version, path=path, metadata=metadata, aliases=tags)

    def _entries(self, name: str) -> list[Entry]:
        """All readable versions of ``name`` in numeric order; broken ones are skipped."""
        aliases = self._aliases(name)
        entries = []
        for number in self._version_numbers(name):
            try:
                entries.append(self._load(name, str(number), aliases))
            except (RegistryError, FileNotFoundError):
                # Junk (unreadable metadata, symlink out of root) or removed meanwhile.
                continue
        return entries

    def names(self) -> list[str]:
        """Sorted names that have at least one version."""
        found = []
        for child in _child_names(self.root):
            try:
                validate_name(child)
                if self._version_numbers(child):
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
        numbers = self._version_numbers(name)
        if not numbers:
            available = self.names()
            raise RegistryError(
                f"artifact {name!r} not found in {self.root}; available: {available}"
                + ("" if available else " (register one first)")
            )
        aliases = self._aliases(name)
        versions = [str(n) for n in numbers]
        if selector is None:
            version = aliases.get(LIVE, versions[-1])
            origin = f"alias {LIVE!r}"
        elif selector.isdigit():
            version, origin = selector, None
        elif selector in aliases:
            version, origin = aliases[selector], f"alias {selector!r}"
        else:
            raise RegistryError(
                f"alias {selector!r} of {name!r} not found; aliases: {sorted(aliases)}, "
                f"versions: {versions} (use '{name}@<version>' or promote a version first)"
            )
        if version not in versions:
            what = f"version {version!r} of {name!r}"
            if origin:
                what += f" (pointed to by {origin})"
            raise RegistryError(
                f"{what} not found; available versions: {versions}"
                + (f", aliases: {aliases}" if aliases else "")
                + (f"; run promote to repoint {origin}" if origin else "")
            )
        try:
            return self._load(name, version, aliases)
        except FileNotFoundError:
            raise RegistryError(
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
            RegistryError: If the reference is malformed, the name is unknown (the message
                lists available names) or the version/alias is unknown (it lists the
                available versions and aliases).
        """
        name, selector = _parse_ref(ref)
        return self._get(name, selector)

    # ----- writing ----------------------------------------------------------------------

    def register(
        self,
        name: str,
        src_dir: str | Path,
        metadata: dict[str, Any],
        *,
        promote: bool = False,
    ) -> Entry:
        """Copy an artifact folder in as the next version of ``name``.

        The copy is assembled in a hidden ``.tmp-<uuid>`` folder, hashed, fsynced and then
        renamed to the next free version number, so readers never see it half-written and
        concurrent writers get distinct versions.

        Args:
            name: Artifact name (see ``validate_name``).
            src_dir: Folder to copy (sub-folders allowed; symlinks are followed). A
                top-level ``lorafleet.json`` in it is replaced by a fresh one.
            metadata: JSON-serialisable dict (base_model, task, method, metrics, config, ...).
                The registry adds name, version, created, files and size_bytes, overriding
                any caller values under those keys.
            promote: Point 'live' at the new version. If ``name`` has no 'live' alias yet
                (e.g. it is the first version), 'live' is set regardless.

        Returns:
            The new entry.

        Raises:
            RegistryError: If the name is invalid, ``src_dir`` is not a folder, or the
                metadata is not a JSON-serialisable dict.
        """
        validate_name(name)
        src = Path(src_dir).expanduser()
        if not src.is_dir():
            raise RegistryError(
                f"cannot register {name!r}: {src} is not a folder; pass the folder the "
                "training run saved (e.g. its adapter/ or model/ folder)"
            )
        if not isinstance(metadata, dict):
            raise RegistryError(
                f"metadata for {name!r} must be a dict, got {type(metadata).__name__}"
            )
        meta = {k: v for k, v in metadata.items() if k not in _REGISTRY_KEYS}
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise RegistryError(
                f"metadata for {name!r} is not JSON-serialisable ({exc}); convert values to "
                "str/int/float/bool/list/dict (e.g. Path -> str, tensors -> float)"
            ) from None

        name_dir = self._name_dir(name)
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._safe(name_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            try:
                _copy_tree(src, tmp)
            except (shutil.Error, OSError) as exc:
                # e.g. a dangling symlink or unreadable file in the source folder.
                raise RegistryError(
                    f"cannot copy {src} into the registry: {exc}; fix or remove the "
                    "offending files and register again"
                ) from None
            files, size = _hash_tree(tmp)
            meta.update(
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                files=files,
                size_bytes=size,
                name=name,
            )
            version = self._rename_into_place(name, name_dir, tmp, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(name_dir)

        with _locked(name_dir):
            aliases = self._aliases(name)
            # "Has no live" rather than "is version 1": also covers a name whose live
            # version was force-removed.
            if promote or aliases.get(LIVE) not in self._version_strings(name):
                aliases[LIVE] = version
                _write_json_atomic(name_dir / ALIASES_FILE, aliases)
        return self._load(name, version, aliases)

    def _version_strings(self, name: str) -> set[str]:
        return {str(n) for n in self._version_numbers(name)}

    def _rename_into_place(
        self, name: str, name_dir: Path, tmp: Path, meta: dict[str, Any]
    ) -> str:
        """Rename ``tmp`` to the next free version number, retrying past taken ones.

        The version number is inside lorafleet.json, so it is rewritten before each try.
        """
        candidate = 0
        for _ in range(_MAX_RENAME_TRIES):
            # Count every numeric folder (finished or not) so junk never blocks a number.
            taken = self._version_numbers(name, valid_only=False)
            candidate = max(candidate, taken[-1] if taken else 0) + 1
            version = str(candidate)
            meta["version"] = version
            _write_json_atomic(tmp / METADATA_FILE, meta)
            _fsync_dir(tmp)
            if _rename_noreplace(tmp, name_dir / version):
                return version
        raise RegistryError(  # pragma: no cover - needs a pathological writer
            f"could not find a free version number for {name!r} after "
            f"{_MAX_RENAME_TRIES} tries; check {name_dir} for stray numeric folders"
        )

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
        _validate_alias(alias)
        name_dir = self._name_dir(name)
        target = self._get(name, _validate_selector(version))
        with _locked(name_dir):
            aliases = self._aliases(name)
            aliases[alias] = target.version
            _write_json_atomic(name_dir / ALIASES_FILE, aliases)
        return self._load(name, target.version, aliases)

    def remove(
        self, name: str, version: str | None = None, *, force: bool = False
    ) -> list[Entry]:
        """Remove one version, or the whole artifact when ``version`` is None.

        Aliases pointing at a removed version are dropped, so ``resolve(name)`` then falls
        back to the latest remaining version.

        Args:
            name: Artifact name.
            version: Version number or alias to remove; None removes every version and
                the aliases.
            force: Allow removing the version 'live' points to while other versions exist.

        Returns:
            The removed entries.

        Raises:
            RegistryError: If the name/version is unknown, or ``version`` is live, other
                versions exist and ``force`` is False.
        """
        validate_name(name)
        name_dir = self._name_dir(name)
        if version is None:
            removed = self.list(name)
            if not removed:
                self._get(name, None)  # raises "not found; available: ..."
            # One rename takes the whole name out of sight, aliases included.
            self.root.mkdir(parents=True, exist_ok=True)
            _delete_tree(name_dir, self.root)
            return removed

        target = self._get(name, _validate_selector(version))
        with _locked(name_dir):
            aliases = self._aliases(name)
            others = self._version_strings(name) - {target.version}
            if aliases.get(LIVE) == target.version and others and not force:
                raise RegistryError(
                    f"{target.ref} is live; promote another version first (e.g. "
                    f"promote({name!r}, {max(others, key=int)!r})) or pass force=True"
                )
            _delete_tree(target.path, name_dir)
            kept = {a: v for a, v in aliases.items() if v != target.version}
            if kept != aliases:
                _write_json_atomic(name_dir / ALIASES_FILE, kept)
        return [target]

    def verify(self, entry: Entry) -> None:
        """Check an entry's files against the sha256 sums in its metadata.

        Args:
            entry: Entry from ``list``/``resolve``/``register``.

        Raises:
            RegistryError: Naming the first missing or modified file, or a file that is
                present but not listed (it could change what a loader picks up).
        """
        path = self._version_dir(entry.name, entry.version)
        try:
            metadata = _read_json(path / METADATA_FILE)
        except FileNotFoundError:
            raise RegistryError(f"{entry.ref} no longer exists in {self.root}") from None
        files = metadata.get("files")
        if not isinstance(files, dict) or not files:
            raise RegistryError(
                f"{entry.ref} has no file checksums in {METADATA_FILE}; re-register it"
            )
        for rel, expected in sorted(files.items()):
            file = path / rel
            try:
                self._safe(file)
            except RegistryError:
                raise RegistryError(
                    f"{entry.ref}: listed file {rel!r} points outside the registry; "
                    "re-register it"
                ) from None
            if not file.is_file():
                raise RegistryError(f"{entry.ref}: file {rel!r} is missing; re-register it")
            if _sha256_file(file) != expected:
                raise RegistryError(
                    f"{entry.ref}: file {rel!r} does not match its sha256 (modified or "
                    "corrupt); re-register it"
                )
        extra = sorted(_list_files(path) - set(files) - {METADATA_FILE})
        if extra:
            raise RegistryError(
                f"{entry.ref}: file {extra[0]!r} is not in the registered file list; "
                "delete it or re-register the artifact"
            )

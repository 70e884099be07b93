"""Registry safety while serving (issue 20 item 5) and DoRA refusal (issue 19 section 3), at unit level.

No Ray start: the registry is real folders in tmp_path, the base models are small fake HF folders
(config.json + a weights file: the fingerprint reads only those), adapters are peft-shaped folders.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorafleet.base_model import BUILD_MARKER, base_fingerprint, check_build_target, install_build
from lorafleet.registry import ArtifactNotFoundError, Registry, RegistryError


def fake_base(folder: Path, *, seed: int = 0, hidden: int = 64) -> Path:
    """A base model folder as far as the fingerprint is concerned: config.json and one weights file."""
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "transformers_version": "4.0"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(bytes((i * 7 + seed) % 256 for i in range(300_000)))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def adapter(folder: Path, *, use_dora: bool = False, r: int = 8) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "use_dora": use_dora, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"weights-" + folder.name.encode())
    return folder


def register(reg: Registry, name: str, src: Path, base: Path | None, **extra: Any):
    """Register as a training run does: base_model + base_fingerprint (None: an old, unfingerprinted one)."""
    meta = {"task": "classification", "method": "lora", "labels": ["a", "b"], **extra}
    if base is not None:
        meta.update(base_model=str(base), base_fingerprint=base_fingerprint(base))
    return reg.register(name, src, meta)


# --- the base fingerprint ------------------------------------------------------------------------------


def test_fingerprint_identifies_the_base_not_its_path(tmp_path: Path) -> None:
    base = fake_base(tmp_path / "tiny")
    fp = base_fingerprint(base)
    assert fp is not None and fp.startswith("sha256:") and len(fp) == 7 + 64
    shutil.copytree(base, tmp_path / "copy")
    assert base_fingerprint(tmp_path / "copy") == fp  # a copy elsewhere is the same base
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9"}, indent=4))
    assert base_fingerprint(tmp_path / "copy") == fp  # re-saved by another transformers version
    (tmp_path / "copy" / "tokenizer.json").write_text('{"x": 1}')
    assert base_fingerprint(tmp_path / "copy") == fp  # not covered: tokenizer files

    # Same architecture and file sizes, other training: the sampled weight bytes differ.
    assert base_fingerprint(fake_base(tmp_path / "retrained", seed=1)) != fp
    assert base_fingerprint(fake_base(tmp_path / "wider", hidden=128)) != fp  # another config
    renamed = shutil.copytree(base, tmp_path / "renamed")
    (renamed / "model.safetensors").rename(renamed / "model-00001-of-00001.safetensors")
    assert base_fingerprint(renamed) != fp
    # Weights changed only in the middle (not at the start or end) are still noticed.
    middle = shutil.copytree(base, tmp_path / "middle")
    data = bytearray((middle / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (middle / "model.safetensors").write_bytes(bytes(data))
    assert base_fingerprint(middle) != fp


def test_fingerprint_is_none_without_a_local_model(tmp_path: Path) -> None:
    assert base_fingerprint(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert base_fingerprint(tmp_path / "empty") is None
    assert base_fingerprint("nobody-has/this-model-cached-xyz") is None  # never downloads


def test_registration_records_the_base_fingerprint(tmp_path: Path) -> None:
    from lorafleet.config import parse_config
    from lorafleet.train.results import RunSummary, register_artifact, run_metadata

    base = fake_base(tmp_path / "tiny")
    cfg = parse_config({"name": "t", "model": {"name_or_path": str(base)}, "task": {"name": "classification"}},
                       "test", tmp_path / "home")
    summary = RunSummary(run_name="r", run_dir=str(tmp_path / "run"), method="lora", task="classification",
                         test_metrics={"accuracy": 1.0}, trainable_params=1, total_params=2, wall_time_s=0.1, steps=1)
    meta = run_metadata(cfg, summary, ["a", "b"])
    assert meta["base_model"] == str(base) and meta["base_fingerprint"] == base_fingerprint(base)
    ref = register_artifact(tmp_path / "reg", "t", adapter(tmp_path / "a1"), meta)
    assert Registry(tmp_path / "reg").resolve(ref).metadata["base_fingerprint"] == base_fingerprint(base)
    # Metadata built elsewhere, naming only base_model, gets the fingerprint at registration too.
    ref = register_artifact(tmp_path / "reg", "t", adapter(tmp_path / "a2"), {"base_model": str(base)})
    assert Registry(tmp_path / "reg").resolve(ref).metadata["base_fingerprint"] == base_fingerprint(base)


# --- serving refuses another base and DoRA (the ingress's AdapterCatalog) --------------------------------


@pytest.fixture()
def served(tmp_path: Path) -> tuple[Registry, Path, Path]:
    """(registry, served base, another base), with adapters trained on each, a DoRA one and an old one."""
    base, other = fake_base(tmp_path / "tiny"), fake_base(tmp_path / "other", seed=3)
    reg = Registry(tmp_path / "reg")
    register(reg, "mine", adapter(tmp_path / "mine"), shutil.copytree(base, tmp_path / "tiny-copy"))
    register(reg, "foreign", adapter(tmp_path / "foreign"), other)
    register(reg, "dora", adapter(tmp_path / "dora", use_dora=True), base)
    register(reg, "old", adapter(tmp_path / "old"), None)
    return reg, base, other


def test_serving_refuses_an_adapter_of_another_base(served) -> None:
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.errors import ServingError

    reg, base, other = served
    catalog = AdapterCatalog(reg.root, "tiny", max_lora_rank=8, base_path=base)
    assert catalog.resolve("mine").ref == "mine@1"  # trained on a copy of the served base
    with pytest.raises(ServingError) as err:
        catalog.resolve("foreign")
    assert err.value.status == 422 and err.value.body.param == "adapter"
    message = err.value.body.message
    assert f"trained on base model '{other}'" in message and f"serves '{base}'" in message
    assert base_fingerprint(other)[:19] in message and base_fingerprint(base)[:19] in message
    assert "foreign" not in catalog.available() and "mine" in catalog.available()
    assert err.value.body.available == catalog.available()


def test_serving_refuses_dora_adapters(served) -> None:
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.errors import ServingError

    reg, base, _ = served
    catalog = AdapterCatalog(reg.root, "tiny", max_lora_rank=8, base_path=base)
    with pytest.raises(ServingError) as err:
        catalog.resolve("dora@1")
    assert err.value.status == 422
    assert "dora@1 is a DoRA adapter" in err.value.body.message
    assert "DoRA adapters cannot be served by vLLM" in err.value.body.message
    assert "method.lora.use_dora=false" in err.value.body.message
    assert "dora" not in catalog.available()
    # Without a served base path (no fingerprint check), DoRA is still refused.
    with pytest.raises(ServingError, match="DoRA adapters cannot be served"):
        AdapterCatalog(reg.root, "tiny", max_lora_rank=8).resolve("dora")


def test_unfingerprinted_adapters_are_served_with_a_warning(served, caplog) -> None:
    from lorafleet.serving.adapters import AdapterCatalog

    reg, base, _ = served
    catalog = AdapterCatalog(reg.root, "tiny", max_lora_rank=8, base_path=base)
    with caplog.at_level(logging.WARNING, logger="lorafleet.serving.compat"):
        assert catalog.resolve("old").ref == "old@1"
        catalog.resolve("old")
    warnings = [r.getMessage() for r in caplog.records if "old@1" in r.getMessage()]
    assert len(warnings) == 1 and "records no base fingerprint" in warnings[0]  # once per version
    assert sorted(catalog.available()) == ["mine", "old"]


# --- a version removed mid-request is a 404, not a 409 -------------------------------------------------------


def test_removed_version_maps_to_404_and_tampering_stays_409() -> None:
    from lorafleet.serving.adapters import AdapterIntegrityError
    from lorafleet.serving.errors import ServingError, registry_errors_as_409

    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(ServingError) as err:
        asyncio.run(registry_errors_as_409(fail(ArtifactNotFoundError("version '2' of 'm' not found"))))
    assert (err.value.status, err.value.body.type) == (404, "not_found_error")
    assert "version '2' of 'm' not found" in err.value.body.message
    with pytest.raises(ServingError) as err:
        asyncio.run(registry_errors_as_409(fail(AdapterIntegrityError("m@2: file 'x' does not match"))))
    assert err.value.status == 409


def test_replica_copy_of_a_removed_version_is_not_found(tmp_path: Path, monkeypatch) -> None:
    from lorafleet.registry import LocalStorage
    from lorafleet.serving.adapters import copy_verified

    reg = Registry(tmp_path / "reg")
    register(reg, "m", adapter(tmp_path / "a1"), None)
    register(reg, "m", adapter(tmp_path / "a2"), None)
    entry = reg.resolve("m@2")  # the ingress resolved it ...
    reg.remove("m", "2", force=True)  # ... then it was removed before the replica copied it
    with pytest.raises(ArtifactNotFoundError, match="m@2 was removed"):
        copy_verified(entry, tmp_path / "cache")
    with pytest.raises(ArtifactNotFoundError):
        reg.resolve("m@2")  # what the replica's loader does first

    # Removed while being copied: the copy fails part-way; still "not found", nothing left behind.
    entry = reg.resolve("m@1")
    original = LocalStorage.copy_out

    def copy_then_lose(self, key: str, dst: Path) -> None:
        reg.remove("m", "1", force=True)
        original(self, key, dst)

    monkeypatch.setattr(LocalStorage, "copy_out", copy_then_lose)
    with pytest.raises(ArtifactNotFoundError):
        copy_verified(entry, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


# --- the replica's copies are bounded and follow Serve's LRU ------------------------------------------------


def test_copy_cache_deletes_released_copies_first(tmp_path: Path) -> None:
    from lorafleet.serving.adapters import CopyCache

    dropped: list[str] = []
    cache = CopyCache(tmp_path, limit=4, on_drop=dropped.append)
    tokens = {}
    for ref in ("a@1", "b@1", "c@1", "d@1"):
        (tmp_path / ref).mkdir()
        tokens[ref] = cache.added(ref)
    assert dropped == [] and cache.refs() == ["a@1", "b@1", "c@1", "d@1"]

    cache.released("c@1", tokens["c@1"])  # Serve's LRU dropped c: it goes first, before older a and b
    (tmp_path / "e@1").mkdir()
    cache.added("e@1")
    assert dropped == ["c@1"] and not (tmp_path / "c@1").exists()
    # Nothing released: the least recently loaded goes.
    (tmp_path / "f@1").mkdir()
    cache.added("f@1")
    assert dropped == ["c@1", "a@1"] and not (tmp_path / "a@1").exists()
    # A stale release (of an earlier hand-out of a re-added ref) changes nothing.
    old = tokens["b@1"]
    cache.added("b@1")  # handed out again: newest now
    cache.released("b@1", old)
    (tmp_path / "g@1").mkdir()
    cache.added("g@1")
    assert dropped[-1] == "d@1" and (tmp_path / "b@1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cache.refs()) and len(cache.refs()) == 4


def test_loader_copies_follow_serves_lru(tmp_path: Path) -> None:
    pytest.importorskip("ray.llm")
    from lorafleet.serving.adapters import REGISTRY_ROOT_KEY, RegistryLoraLoader

    reg = Registry(tmp_path / "reg")
    for name in ("a", "b", "c", "d"):
        register(reg, name, adapter(tmp_path / name), None)

    class LoraConfig:
        max_num_adapters_per_replica = 1  # Serve's LRU and vLLM's max_loras: 1, so 2 copies at most

    class Cfg:
        experimental_configs = {REGISTRY_ROOT_KEY: str(reg.root)}
        lora_config = LoraConfig()

    loader = RegistryLoraLoader(lora_root=str(tmp_path / "cache"))
    root = Path(loader.lora_root)

    def load(ref: str):
        return asyncio.run(loader.load_model_from_config(f"tiny:{ref}", Cfg()))

    def evict(config) -> None:  # what ray.serve.multiplex's unload_model_lru does
        config.__del__()
        config.__del__ = lambda _: None

    a = load("a@1")
    assert Path(a.local_path) == root / "a@1" and (root / "a@1" / "adapter_config.json").is_file()
    evict(a)
    b = load("b@1")
    evict(b)
    c = load("c@1")
    assert sorted(p.name for p in root.iterdir()) == ["b@1", "c@1"]  # a (released first) deleted
    evict(c)
    d = load("d@1")
    assert sorted(p.name for p in root.iterdir()) == ["c@1", "d@1"]
    # A deleted copy comes back, checked again, at the path vLLM already knows, with the same int id.
    evict(d)
    a2 = load("a@1")
    assert (a2.local_path, a2.lora_assigned_int_id) == (a.local_path, a.lora_assigned_int_id)
    assert (root / "a@1" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["a@1", "d@1"]


# --- `lorafleet base build --out` never deletes a folder it did not create ------------------------------------


def test_build_target_refuses_foreign_folders(tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(FileExistsError, match=r"not made by `lorafleet base build`.*never deleted"):
        check_build_target(mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        check_build_target(tmp_path / "file")
    assert check_build_target(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_build_target(tmp_path / "empty")
    with pytest.raises(FileExistsError):
        install_build(adapter(tmp_path / "build"), mine, {"steps": 0})
    assert (mine / "cat.jpg").read_bytes() == b"meow" and (tmp_path / "build").is_dir()


def test_install_build_replaces_only_an_earlier_build(tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    install_build(fake_base(tmp_path / "b1"), out, {"steps": 0})
    assert json.loads((out / BUILD_MARKER).read_text()) == {"steps": 0}
    first = base_fingerprint(out)
    install_build(fake_base(tmp_path / "b2", seed=5), out, {"steps": 1})  # an earlier build: replaced
    assert base_fingerprint(out) != first and json.loads((out / BUILD_MARKER).read_text()) == {"steps": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging or old folders left


def test_base_build_replaces_its_own_build(tmp_path: Path) -> None:
    from lorafleet.pretrain import build_base

    out = tmp_path / "models" / "tiny"
    build_base(out, steps=0, progress=False)  # random weights: no Ray, about a second
    assert json.loads((out / BUILD_MARKER).read_text())["steps"] == 0 and (out / "config.json").is_file()
    build_base(out, steps=0, progress=False)  # its own earlier build: replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no init, staging or old folders left


def test_base_build_refuses_before_building(tmp_path: Path) -> None:
    from lorafleet.pretrain import build_base

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never deleted"):  # the CLI prints it as `error: ...`, exit 2
        build_base(mine, steps=0)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing staged beside it


def test_base_build_cli_refuses_before_ray_starts(tmp_path: Path, capsys, monkeypatch) -> None:
    from lorafleet import cluster
    from lorafleet.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: pytest.fail("Ray started before the refusal"))
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    assert main(["base", "build", "--out", str(mine), "--steps", "0"]) == 2
    assert "never deleted" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"


# --- `lorafleet adapters rm` / `promote` -------------------------------------------------------------------------


def test_cli_rm_refuses_the_live_version_without_force(tmp_path: Path, capsys, monkeypatch) -> None:
    from lorafleet.cli import main

    home = tmp_path / "h"
    monkeypatch.setenv("LORAFLEET_HOME", str(home))  # --home sets it for the process: restored after the test
    reg = Registry(home / "registry")
    register(reg, "m", adapter(tmp_path / "a1"), None)
    register(reg, "m", adapter(tmp_path / "a2"), None)
    reg.promote("m", "2")

    assert main(["adapters", "rm", "m", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "m@2, the live version" in err and "--force" in err
    assert main(["adapters", "rm", "m", "2", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "m@2, the live version" in err and "--force" in err and "lorafleet adapters promote m 1" in err
    assert [e.version for e in reg.list("m")] == ["1", "2"]  # nothing removed

    assert main(["adapters", "rm", "m", "1", "--home", str(home)]) == 0  # not live: no flag needed
    assert main(["adapters", "rm", "m", "--force", "--home", str(home)]) == 0
    assert "removed m@2" in capsys.readouterr().out and reg.names() == []


def test_cli_promote_warns_about_dora(tmp_path: Path, capsys, monkeypatch) -> None:
    from lorafleet.cli import main

    home = tmp_path / "h"
    monkeypatch.setenv("LORAFLEET_HOME", str(home))  # --home sets it for the process: restored after the test
    reg = Registry(home / "registry")
    register(reg, "m", adapter(tmp_path / "a1"), None)
    register(reg, "m", adapter(tmp_path / "a2", use_dora=True), None)
    assert main(["adapters", "promote", "m", "2", "--home", str(home)]) == 0  # promote does not refuse
    out = capsys.readouterr()
    assert "m: live -> 2" in out.out and "warning: m@2 is a DoRA adapter" in out.err
    assert reg.resolve("m").version == "2"
    assert main(["adapters", "promote", "m", "1", "--home", str(home)]) == 0
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(RegistryError):
        reg.remove("m", "1")

"""Tests for lorafleet.registry: real folders in tmp_path, checksums computed independently."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lorafleet.registry import storage as registry_mod
from lorafleet.registry import (
    ArtifactNotFoundError,
    Entry,
    LiveVersionError,
    Registry,
    RegistryError,
    validate_name,
)

META: dict[str, Any] = {
    "base_model": "tiny-llama-2l-64",
    "task": "classify",
    "method": "lora",
    "metrics": {"accuracy": 0.75},
    "trainable_params": 4096,
    "total_params": 123456,
    "wall_time_s": 1.5,
    "config": {"train": {"lr": 3e-4, "max_steps": 2}},
}


def make_adapter(folder: Path, tag: str = "a") -> Path:
    """A small peft-shaped adapter folder with a sub-folder, contents varied by ``tag``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "tag": tag}))
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4 + tag.encode())
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text(f"hello\nworld\n{tag}\n")
    return folder


def sha256_tree(folder: Path) -> dict[str, str]:
    """Independent reference checksums: {posix relative path: sha256}."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture()
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    return make_adapter(tmp_path / "run" / "adapter")


def test_root_is_created_lazily(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    reg = Registry(root)
    assert reg.list() == []
    assert reg.names() == []
    assert not root.exists()


def test_register_copies_files_and_writes_metadata(reg: Registry, src: Path) -> None:
    entry = reg.register("sst2-lora", src, META)

    assert entry.ref == "sst2-lora@1"
    assert entry.path == reg.root / "sst2-lora" / "1"
    expected = sha256_tree(src)
    assert set(expected) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer/vocab.txt",
    }
    for rel in expected:
        assert (entry.path / rel).read_bytes() == (src / rel).read_bytes()

    on_disk = json.loads((entry.path / "lorafleet.json").read_text())
    assert on_disk == entry.metadata
    assert on_disk["files"] == expected
    assert on_disk["size_bytes"] == sum((src / rel).stat().st_size for rel in expected)
    assert on_disk["name"] == "sst2-lora"
    assert on_disk["version"] == "1"
    assert on_disk["created"].endswith("+00:00")
    for key, value in META.items():
        assert on_disk[key] == value
    # The caller's dict is not mutated.
    assert "files" not in META


def test_register_replaces_source_metadata_and_registry_keys_win(
    reg: Registry, src: Path
) -> None:
    (src / "lorafleet.json").write_text('{"name": "stale", "version": "9"}')
    entry = reg.register("x", src, {**META, "version": "99", "name": "other"})
    assert entry.metadata["version"] == "1"
    assert entry.metadata["name"] == "x"
    assert "lorafleet.json" not in entry.metadata["files"]


def test_versions_increment_and_first_is_live(reg: Registry, src: Path, tmp_path: Path) -> None:
    e1 = reg.register("m", src, META)
    e2 = reg.register("m", make_adapter(tmp_path / "v2", "b"), META)
    e3 = reg.register("m", make_adapter(tmp_path / "v3", "c"), META)

    assert [e.version for e in (e1, e2, e3)] == ["1", "2", "3"]
    assert e1.aliases == ("live",)
    assert e2.aliases == () and e3.aliases == ()
    assert json.loads((reg.root / "m" / "aliases.json").read_text()) == {"live": "1"}
    assert reg.resolve("m").version == "1"
    assert [e.version for e in reg.list("m")] == ["1", "2", "3"]


def test_register_with_promote_moves_live(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    e2 = reg.register("m", src, META, promote=True)
    assert e2.aliases == ("live",)
    assert reg.resolve("m").ref == "m@2"
    assert reg.resolve("m@1").aliases == ()


def test_promote_moves_live_and_resolve_follows(reg: Registry, src: Path) -> None:
    for _ in range(3):
        reg.register("m", src, META)
    assert reg.resolve("m").version == "1"

    promoted = reg.promote("m", "3")
    assert promoted.ref == "m@3" and promoted.aliases == ("live",)
    assert reg.resolve("m").version == "3"
    assert reg.resolve("m@live").version == "3"
    assert reg.resolve("m@1").version == "1"
    assert reg.resolve("m@1").metadata["version"] == "1"

    canary = reg.promote("m", "2", alias="canary")
    assert canary.aliases == ("canary",)
    assert reg.resolve("m@canary").version == "2"
    assert reg.resolve("m").version == "3"  # other aliases leave live alone
    # An alias can be promoted from another alias.
    assert reg.promote("m", "canary").ref == "m@2"
    assert reg.resolve("m").aliases == ("canary", "live")


def test_resolve_without_alias_falls_back_to_latest(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    (reg.root / "m" / "aliases.json").unlink()
    assert reg.resolve("m").version == "2"


def test_list_sorts_by_name_then_numeric_version(reg: Registry, src: Path) -> None:
    for _ in range(11):
        reg.register("b", src, META)
    reg.register("a", src, META)
    refs = [e.ref for e in reg.list()]
    assert refs == ["a@1"] + [f"b@{i}" for i in range(1, 12)]
    assert reg.names() == ["a", "b"]
    assert reg.list("nope") == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 65, "a\\b", "a..b", "a b"])
def test_bad_names_are_rejected_with_a_helpful_message(
    reg: Registry, src: Path, bad: str
) -> None:
    with pytest.raises(RegistryError, match="invalid artifact name") as info:
        validate_name(bad)
    assert repr(bad) in str(info.value)
    assert "letters, digits" in str(info.value)
    with pytest.raises(RegistryError, match="invalid artifact name"):
        reg.register(bad, src, META)
    with pytest.raises(RegistryError, match="invalid artifact name"):
        reg.resolve(bad)
    # Nothing was written anywhere, in particular not outside the root.
    assert not reg.root.exists()


def test_good_names_pass() -> None:
    for good in ["a", "sst2-lora", "Qwen2.5_0.5B-lora", "x" * 64]:
        assert validate_name(good) == good


def test_bad_versions_and_aliases_are_rejected(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    for ref in ["m@../1", "m@x y", "m@0", "m@a/b", "m@.tmp-x", "m@1@2"]:
        with pytest.raises(RegistryError, match="invalid"):
            reg.resolve(ref)
    with pytest.raises(RegistryError, match="after '@'"):
        reg.resolve("m@")
    with pytest.raises(RegistryError, match="must not be all digits"):
        reg.promote("m", "1", alias="2")


def test_unknown_name_lists_available_names(reg: Registry, src: Path) -> None:
    reg.register("alpha", src, META)
    reg.register("beta", src, META)
    with pytest.raises(RegistryError, match="'gamma' not found") as info:
        reg.resolve("gamma")
    assert "['alpha', 'beta']" in str(info.value)


def test_unknown_name_in_empty_registry_says_to_register(reg: Registry) -> None:
    with pytest.raises(RegistryError, match=r"available: \[\] \(register one first\)"):
        reg.resolve("m")


def test_unknown_version_and_alias_list_what_exists(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    with pytest.raises(RegistryError, match=r"version '7' of 'm' not found") as info:
        reg.resolve("m@7")
    assert "['1', '2']" in str(info.value)
    with pytest.raises(RegistryError, match=r"alias 'canary' of 'm' not found") as info:
        reg.resolve("m@canary")
    assert "['live']" in str(info.value) and "['1', '2']" in str(info.value)
    with pytest.raises(RegistryError, match="not found"):
        reg.promote("m", "7")


def test_verify_passes_then_detects_tampering(reg: Registry, src: Path) -> None:
    entry = reg.register("m", src, META)
    reg.verify(entry)

    (entry.path / "tokenizer" / "vocab.txt").write_text("tampered\n")
    with pytest.raises(RegistryError, match=r"'tokenizer/vocab.txt' does not match its sha256"):
        reg.verify(entry)


def test_verify_detects_missing_and_extra_files(reg: Registry, src: Path) -> None:
    entry = reg.register("m", src, META)
    (entry.path / "adapter_config.json").unlink()
    with pytest.raises(RegistryError, match=r"'adapter_config.json' is missing"):
        reg.verify(entry)

    other = reg.register("n", src, META)
    (other.path / "adapter_model.bin").write_bytes(b"sneaky")
    with pytest.raises(RegistryError, match=r"'adapter_model.bin' is not in the registered"):
        reg.verify(other)


def test_remove_refuses_live_without_force(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    reg.register("m", src, META)

    with pytest.raises(LiveVersionError, match=r"m@1 is the live version .*promote another version first") as err:
        reg.remove("m", "1")
    assert (err.value.name, err.value.live, err.value.others) == ("m", "1", ["2", "3"])
    assert (reg.root / "m" / "1").is_dir()

    removed = reg.remove("m", "2")
    assert [e.ref for e in removed] == ["m@2"]
    assert not (reg.root / "m" / "2").exists()
    assert [e.version for e in reg.list("m")] == ["1", "3"]

    removed = reg.remove("m", "1", force=True)
    assert [e.ref for e in removed] == ["m@1"]
    # The dangling alias is dropped, so the bare name falls back to the latest version.
    assert json.loads((reg.root / "m" / "aliases.json").read_text()) == {}
    assert reg.resolve("m").version == "3"
    # Without a 'live' alias the latest version is what resolve (and serving) picks: it is live too.
    with pytest.raises(LiveVersionError, match=r"m@3 is the live version.*it is the only version"):
        reg.remove("m", "3")
    assert [e.ref for e in reg.remove("m", "3", force=True)] == ["m@3"]
    assert reg.names() == []
    # No trash or temp folders are left behind.
    assert [p.name for p in (reg.root / "m").iterdir() if p.is_dir()] == []


def test_remove_drops_aliases_of_removed_version(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    reg.promote("m", "2", alias="canary")
    reg.remove("m", "canary")
    assert json.loads((reg.root / "m" / "aliases.json").read_text()) == {"live": "1"}


def test_remove_whole_name(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    reg.register("keep", src, META)
    # Every version includes the live one (what serving answers 'm' with): only with force.
    with pytest.raises(LiveVersionError, match=r"would remove m@1, the live version.*force=True") as err:
        reg.remove("m")
    assert (err.value.live, err.value.others) == ("1", ["2"])
    assert [e.version for e in reg.list("m")] == ["1", "2"]
    removed = reg.remove("m", force=True)
    assert [e.ref for e in removed] == ["m@1", "m@2"]
    assert not (reg.root / "m").exists()
    assert reg.names() == ["keep"]
    assert sorted(p.name for p in reg.root.iterdir()) == ["keep"]
    with pytest.raises(ArtifactNotFoundError, match="'m' not found"):
        reg.remove("m", force=True)


def test_first_register_after_live_removed_becomes_live(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    reg.register("m", src, META)
    reg.remove("m", "1", force=True)
    entry = reg.register("m", src, META)
    assert entry.version == "3" and entry.aliases == ("live",)


def test_crashed_writer_tmp_folder_is_invisible(reg: Registry, src: Path) -> None:
    reg.register("m", src, META)
    crashed = reg.root / "m" / ".tmp-deadbeef"
    make_adapter(crashed, "half")
    (crashed / "lorafleet.json").write_text('{"version": "2"}')
    (reg.root / ".tmp-1234").mkdir()  # a crashed whole-name write

    assert [e.ref for e in reg.list()] == ["m@1"]
    assert reg.names() == ["m"]
    assert reg.resolve("m").version == "1"
    with pytest.raises(RegistryError):
        reg.resolve("m@.tmp-deadbeef")
    # The next version is still 2, and the leftover does not interfere.
    assert reg.register("m", src, META).version == "2"


def test_list_skips_junk(reg: Registry, src: Path, tmp_path: Path) -> None:
    reg.register("m", src, META)
    root = reg.root
    (root / "README.txt").write_text("not an artifact")
    (root / "bad name").mkdir()
    (root / "bad name" / "1").mkdir()
    (root / "empty").mkdir()
    (root / "m" / "notes").mkdir()  # non-numeric folder
    (root / "m" / "07").mkdir()  # non-canonical number
    (root / "m" / "5").mkdir()  # numeric but no metadata (hand-copied, unfinished)
    (root / "m" / "6").mkdir()
    (root / "m" / "6" / "lorafleet.json").write_text("{not json")
    (root / "m" / "stray.bin").write_bytes(b"x")
    outside = make_adapter(tmp_path / "outside")
    (outside / "lorafleet.json").write_text('{"version": "8"}')
    (root / "m" / "8").symlink_to(outside, target_is_directory=True)

    assert [e.ref for e in reg.list()] == ["m@1"]
    assert reg.names() == ["m"]
    # A symlink pointing out of the registry cannot be resolved.
    with pytest.raises(RegistryError, match="outside the registry root"):
        reg.resolve("m@8")
    # Junk numeric folders are never reused as version numbers.
    assert reg.register("m", src, META).version == "9"


def test_register_rejects_bad_inputs(reg: Registry, src: Path, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="is not a folder"):
        reg.register("m", tmp_path / "missing", META)
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        reg.register("m", src, {"path": Path("/x")})
    # Inputs are checked before anything is written.
    assert not reg.root.exists()

    # A copy that fails half-way (dangling symlink) leaves no temp folder behind.
    (src / "broken").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(RegistryError, match="cannot copy .*fix or remove"):
        reg.register("m", src, META)
    assert reg.list() == []
    assert [p.name for p in (reg.root / "m").iterdir()] == []


def test_register_retries_when_version_taken_meanwhile(
    reg: Registry, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate another writer renaming version 2 into place between our scan and rename."""
    reg.register("m", src, META)
    real_rename = registry_mod._rename_noreplace
    calls: list[str] = []

    def racing_rename(tmp: Path, dst: Path) -> bool:
        calls.append(dst.name)
        if len(calls) == 1:
            other = Registry(reg.root)
            monkeypatch.setattr(registry_mod, "_rename_noreplace", real_rename)
            assert other.register("m", make_adapter(tmp_path / "other", "o"), META).version == "2"
            monkeypatch.setattr(registry_mod, "_rename_noreplace", racing_rename)
        return real_rename(tmp, dst)

    monkeypatch.setattr(registry_mod, "_rename_noreplace", racing_rename)
    entry = reg.register("m", src, META)
    assert calls == ["2", "3"]
    assert entry.version == "3"
    assert entry.metadata["version"] == "3"
    assert json.loads((entry.path / "lorafleet.json").read_text())["version"] == "3"
    assert reg.resolve("m@2").metadata["files"] == sha256_tree(tmp_path / "other")
    assert [p.name for p in (reg.root / "m").iterdir() if p.name.startswith(".tmp-")] == []


def _assert_all_versions_whole(reg: Registry, name: str, n: int) -> None:
    entries = reg.list(name)
    assert sorted(int(e.version) for e in entries) == list(range(1, n + 1))
    for e in entries:
        assert e.metadata["version"] == e.version
        reg.verify(e)
    leftovers = [p.name for p in (reg.root / name).iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert reg.resolve(name).aliases == ("live",)


def test_concurrent_registers_from_threads_get_distinct_versions(
    reg: Registry, tmp_path: Path
) -> None:
    srcs = [make_adapter(tmp_path / f"src{i}", str(i)) for i in range(8)]
    barrier = threading.Barrier(len(srcs))
    results: list[Entry] = []
    errors: list[BaseException] = []

    def work(s: Path) -> None:
        barrier.wait()
        try:
            for _ in range(3):
                results.append(Registry(reg.root).register("m", s, META))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len({e.version for e in results}) == len(results) == 24
    _assert_all_versions_whole(reg, "m", 24)
    # Each version holds exactly the files of the writer that got it.
    by_tag = {json.loads((e.path / "adapter_config.json").read_text())["tag"] for e in results}
    assert by_tag == {str(i) for i in range(8)}


def _register_in_process(root: str, src: str) -> str:
    return Registry(root).register("m", src, META).version


def test_concurrent_registers_from_processes_get_distinct_versions(
    reg: Registry, tmp_path: Path
) -> None:
    srcs = [str(make_adapter(tmp_path / f"src{i}", str(i))) for i in range(4)]
    # fork: fast, and the child needs no import path setup.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:
        versions = list(pool.map(_register_in_process, [str(reg.root)] * 12, srcs * 3))
    assert len(set(versions)) == 12
    _assert_all_versions_whole(reg, "m", 12)


def test_entry_is_hashable_and_ref(reg: Registry, src: Path) -> None:
    entry = reg.register("m", src, META)
    assert {entry, reg.resolve("m@1")} == {entry}
    assert entry.ref == "m@1"


def test_not_found_is_its_own_error_type(reg: Registry, src: Path) -> None:
    """Serving maps ArtifactNotFoundError to 404 and other registry errors to 409/422, so the
    type must say which: unknown name, version, alias, or a version removed after it was resolved."""
    entry = reg.register("m", src, META)
    reg.register("m", src, META)
    for ref, match in (("nope", "'nope' not found"), ("m@9", "version '9' of 'm' not found"),
                       ("m@canary", "alias 'canary' of 'm' not found")):
        with pytest.raises(ArtifactNotFoundError, match=match):
            reg.resolve(ref)
    reg.remove("m", "1", force=True)
    with pytest.raises(ArtifactNotFoundError, match="no longer exists"):
        reg.verify(entry)
    with pytest.raises(ArtifactNotFoundError, match="version '1' of 'm' not found"):
        reg.resolve("m@1")  # what the serving replica does with an id the ingress resolved earlier
    for bad in ("../x", "m@", "m@0"):  # malformed: a plain RegistryError, not "not found"
        with pytest.raises(RegistryError) as err:
            reg.resolve(bad)
        assert not isinstance(err.value, ArtifactNotFoundError)


def test_live_version_error_survives_pickling() -> None:
    """It may cross a process boundary (a Ray task): its fields must come back."""
    import pickle

    err = pickle.loads(pickle.dumps(LiveVersionError("msg", name="m", live="2", others=["1"])))
    assert (str(err), err.name, err.live, err.others) == ("msg", "m", "2", ["1"])


def test_remove_with_dangling_live_alias_protects_the_latest(reg: Registry, src: Path) -> None:
    """A 'live' alias edited to point at nothing: the latest version is what a repaired resolve
    gives, so it is the one protected; the others go without force."""
    reg.register("m", src, META)
    reg.register("m", src, META)
    (reg.root / "m" / "aliases.json").write_text(json.dumps({"live": "7"}))
    with pytest.raises(LiveVersionError, match="m@2 is the live version"):
        reg.remove("m", "2")
    assert [e.ref for e in reg.remove("m", "1")] == ["m@1"]

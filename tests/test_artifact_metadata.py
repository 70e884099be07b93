"""registry/metadata.py: the typed lorafleet.json, written by training and sweeps, read by everyone.

The JSON stays what it was (same keys, same values): old registry versions load, unknown keys survive,
and a key of the wrong type reads as missing rather than making the version unreadable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from lorafleet.registry import ArtifactMetadata, Registry, SweepOrigin

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "lorafleet"

# A lorafleet.json as registry versions before base fingerprints were recorded wrote it (plus a key
# no version of lorafleet writes): every key must read, and write back, unchanged.
OLD_VERSION = {
    "base_model": "/home/u/.lorafleet/models/tiny", "task": "classification", "method": "lora",
    "labels": ["billing", "technical"], "metrics": {"test": {"accuracy": 0.75, "macro_f1": 0.5}},
    "trainable_params": 4096, "total_params": 123456, "wall_time_s": 3, "steps": 20, "run": "/runs/r",
    "config": {"task": {"name": "classification", "labels": ["billing", "technical"]}},
    "name": "tickets-lora", "version": "1", "created": "2026-11-01T10:00:00+00:00",
    "files": {"adapter_config.json": "ab" * 32}, "size_bytes": 1234, "notes": {"by": "hand"},
}


def test_old_versions_and_unknown_keys_read_and_write_back_unchanged():
    meta = ArtifactMetadata.read(OLD_VERSION)
    assert meta.dump() == OLD_VERSION
    assert json.dumps(meta.dump(), sort_keys=True) == json.dumps(OLD_VERSION, sort_keys=True)  # 3 stays 3, not 3.0
    assert (meta.task, meta.labels, meta.base_fingerprint, meta.version) == (
        "classification", ["billing", "technical"], None, "1")
    assert meta.test_metrics == {"accuracy": 0.75, "macro_f1": 0.5} and meta.task_config["name"] == "classification"
    assert meta.lists_file("adapter_config.json") and not meta.lists_file("head.json")
    assert ArtifactMetadata.read({}).dump() == {} and ArtifactMetadata.read(None).task is None
    # A hand-edited key of the wrong type reads as missing; the rest of the version still reads.
    odd = ArtifactMetadata.read({**OLD_VERSION, "steps": "many", "labels": "billing"})
    assert odd.steps is None and odd.labels is None and odd.task == "classification"
    # Flat metrics (as some hand-registered versions have them) are kept, and have no test split.
    assert ArtifactMetadata.read({"metrics": {"accuracy": 0.75}}).test_metrics == {}


def test_run_metadata_writes_the_keys_and_values_it_always_wrote(tmp_path):
    """The dict run_metadata wrote before the model, spelled out: languages only for translation,
    labels written even when None, total_params when the run knows it; since the generation budget
    (task.max_new_tokens) is in the config, also the task's resolved budget for generating tasks."""
    from lorafleet.base_model import base_fingerprint
    from lorafleet.config import parse_config
    from lorafleet.train.results import run_metadata

    summary = SimpleNamespace(test_metrics={"bleu": 12.5}, trainable_params=10, total_params=100, wall_time_s=1.25,
                              steps=4, run_dir="/runs/r")
    for task, budget in (({"name": "translation", "source_lang": "German", "target_lang": "English"}, 48),
                         ({"name": "summarization", "max_new_tokens": 128}, 128), ({"name": "classification"}, None)):
        cfg = parse_config({"name": "t", "task": task}, "t", home=tmp_path)
        languages = {"source_lang": "German", "target_lang": "English"} if task["name"] == "translation" else {}
        budgets = {"max_new_tokens": budget} if budget is not None else {}  # none for classification
        want = {"base_model": cfg.model.name_or_path, "base_fingerprint": base_fingerprint(cfg.model.name_or_path),
                "task": task["name"], "method": cfg.method.name, "labels": None, **languages, **budgets,
                "metrics": {"test": {"bleu": 12.5}}, "trainable_params": 10, "total_params": 100,
                "wall_time_s": 1.25, "steps": 4, "run": "/runs/r", "config": cfg.model_dump(mode="json")}
        got = run_metadata(cfg, summary, None)
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_the_generation_budget_round_trips_and_old_versions_lack_it(tmp_path):
    """max_new_tokens is registered with a generating task's artifact and read back typed; a version
    written before it (OLD_VERSION) or with a hand-edited bad value reads it as missing."""
    from lorafleet.config import parse_config
    from lorafleet.train.results import artifact_metadata, register_artifact

    cfg = parse_config({"name": "notes", "task": {"name": "summarization", "max_new_tokens": 96}}, "t", home=tmp_path)
    meta = artifact_metadata(cfg, None, test_metrics={}, trainable_params=1, wall_time_s=0, steps=1, run_dir=None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    entry = Registry(tmp_path / "reg").resolve(register_artifact(tmp_path / "reg", "notes", adapter, meta))
    assert entry.meta.max_new_tokens == 96 and entry.meta.task_config["max_new_tokens"] == 96
    assert json.loads((Path(entry.path) / "lorafleet.json").read_text())["max_new_tokens"] == 96
    assert ArtifactMetadata.read(OLD_VERSION).max_new_tokens is None
    assert "max_new_tokens" not in ArtifactMetadata.read(OLD_VERSION).dump()
    for bad in ("long", 0):
        assert ArtifactMetadata.read({**OLD_VERSION, "max_new_tokens": bad}).max_new_tokens is None


def test_a_sweep_winner_records_its_sweep_and_no_total_params(tmp_path):
    """A trial reports no total_params: the winner's metadata leaves the key out (no fake 0), and the
    sweep that found it reads back typed."""
    from lorafleet.config import parse_config
    from lorafleet.train.results import artifact_metadata, register_artifact

    cfg = parse_config({"name": "t", "task": {"name": "classification"}}, "t", home=tmp_path)
    origin = SweepOrigin(name="sw", dir=str(tmp_path / "sw"), trial_id="t_00001", metric="accuracy", value=0.75,
                         params={"train.lr": 0.001}, trials=4)
    meta = artifact_metadata(cfg, ["a", "b"], test_metrics={"accuracy": 0.5}, trainable_params=7, wall_time_s=2.5,
                             steps=12, run_dir="/sw/trials/t_00001").model_copy(update={"sweep": origin})
    assert "total_params" not in meta.dump() and meta.dump()["sweep"]["trial_id"] == "t_00001"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    ref = register_artifact(tmp_path / "reg", "sw-best", adapter, meta)
    entry = Registry(tmp_path / "reg").resolve(ref)
    assert entry.meta.total_params is None and entry.meta.sweep.trials == 4 and entry.meta.labels == ["a", "b"]
    assert entry.meta.version == "1" and entry.meta.lists_file("adapter_config.json")  # the registry's own keys
    assert "total_params" not in json.loads((Path(entry.path) / "lorafleet.json").read_text())


def test_no_string_key_metadata_access_outside_the_model():
    """Readers go through Entry.meta (ArtifactMetadata): no `metadata["..."]` / `metadata.get("...")`."""
    pattern = re.compile(r"""metadata\[\s*["']|metadata\.get\(\s*["']""")
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py")
                 if path.name != "metadata.py" or path.parent.name != "registry"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []

"""The object-store registry, s3:// data and an s3:// run, against a real S3 API on loopback.

moto's server (a dev dependency) runs in its own process on 127.0.0.1; boto3, pyarrow and Ray Train
reach it through AWS_ENDPOINT_URL, as they would reach MinIO or AWS. Nothing is mocked: every call
is an HTTP request to that server. The serving half (adapters loaded from an s3 registry, promoted
while serving) is in tests/test_serving_replicas.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import LORAFLEET, REPO, cli_env, last_json, moto_s3, run_cli, stop_tree
from test_registry import make_adapter

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def aws():
    with moto_s3() as env:
        yield env


@pytest.fixture
def bucket(aws) -> str:
    import boto3

    name = f"fleet-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _s3():
    import boto3

    return boto3.client("s3")


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# --- the registry ---------------------------------------------------------------------------------------


def test_s3_registry_register_list_promote_remove(bucket, tmp_path):
    from lorafleet.registry import LiveVersionError, Registry

    reg = Registry(f"s3://{bucket}/home/registry")
    assert reg.names() == [] and reg.list() == []
    first = reg.register("m", make_adapter(tmp_path / "a", "a"), {"task": "classification"})
    second = reg.register("m", make_adapter(tmp_path / "b", "b"), {"task": "classification"})
    assert (first.ref, second.ref) == ("m@1", "m@2")
    assert first.path == f"s3://{bucket}/home/registry/m/1" and first.aliases == ("live",)
    # The local layout, under the prefix; the metadata object written last holds the checksums.
    assert sorted(_keys(bucket, "home/registry/m/2/")) == [
        f"home/registry/m/2/{f}" for f in
        ("adapter_config.json", "adapter_model.safetensors", "lorafleet.json", "tokenizer/vocab.txt")]
    meta = json.loads(_s3().get_object(Bucket=bucket, Key="home/registry/m/2/lorafleet.json")["Body"].read())
    assert set(meta["files"]) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer/vocab.txt"}
    assert second.read_json("adapter_config.json") == {"r": 8, "tag": "b"}

    assert reg.resolve("m").ref == "m@1"  # live follows the first version until promoted
    reg.promote("m", "2")
    assert reg.resolve("m").ref == "m@2" and [e.ref for e in reg.list("m")] == ["m@1", "m@2"]
    with pytest.raises(LiveVersionError):
        reg.remove("m", "2")
    reg.remove("m", "1")
    assert [e.ref for e in reg.list()] == ["m@2"] and not _keys(bucket, "home/registry/m/1/")
    # A loader's local copy is checked against the sums and holds exactly the registered files.
    local = reg.local_path(reg.resolve("m"))
    assert (local / "tokenizer" / "vocab.txt").read_text() == "hello\nworld\nb\n"


def test_s3_publish_skips_claimed_numbers_and_hides_unfinished_versions(bucket, tmp_path):
    from lorafleet.registry import Registry

    reg = Registry(f"s3://{bucket}/r")
    reg.register("m", make_adapter(tmp_path / "a", "a"), {})
    # A writer that died after claiming version 2, and a version 3 whose metadata never arrived.
    _s3().put_object(Bucket=bucket, Key="r/m/2/.claim", Body=b"")
    _s3().put_object(Bucket=bucket, Key="r/m/3/adapter_config.json", Body=b"{}")
    assert [e.ref for e in reg.list("m")] == ["m@1"]
    assert reg.register("m", make_adapter(tmp_path / "b", "b"), {}).ref == "m@4"
    assert [e.ref for e in reg.list("m")] == ["m@1", "m@4"]
    assert not any(".tmp-" in k for k in _keys(bucket, "r/")), "staged objects must be gone after publish"


def test_s3_concurrent_registers_get_distinct_versions(bucket, tmp_path):
    from lorafleet.registry import Registry

    reg = Registry(f"s3://{bucket}/r")
    sources = [make_adapter(tmp_path / f"s{i}", f"t{i}") for i in range(8)]
    refs: list[str] = []
    threads = [threading.Thread(target=lambda s=s: refs.append(Registry(reg.root).register("m", s, {}).ref))
               for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(refs, key=lambda r: int(r.split("@")[1])) == [f"m@{i}" for i in range(1, 9)]
    # Each version holds its own writer's files, untouched by the writers that lost a number to it.
    tags = {reg.resolve(r).read_json("adapter_config.json")["tag"] for r in refs}
    assert tags == {f"t{i}" for i in range(8)}
    for entry in reg.list("m"):
        reg.verify(entry)


def test_s3_tampered_or_extra_objects_are_refused_on_load(bucket, tmp_path):
    from lorafleet.registry import RegistryError, Registry
    from lorafleet.serving.adapters import AdapterIntegrityError, copy_verified

    reg = Registry(f"s3://{bucket}/r")
    entry = reg.register("m", make_adapter(tmp_path / "a", "a"), {})
    reg.verify(entry)
    _s3().put_object(Bucket=bucket, Key="r/m/1/adapter_model.safetensors", Body=b"not the weights")
    with pytest.raises(RegistryError, match="'adapter_model.safetensors' does not match its sha256"):
        reg.verify(entry)
    with pytest.raises(AdapterIntegrityError, match="does not match its sha256"):
        copy_verified(entry, tmp_path / "cache")  # what a serving replica does before vLLM sees it
    assert list((tmp_path / "cache").iterdir()) == []

    other = reg.register("n", make_adapter(tmp_path / "b", "b"), {})
    _s3().put_object(Bucket=bucket, Key="r/n/1/tokenizer/extra.txt", Body=b"x")
    with pytest.raises(RegistryError, match="'tokenizer/extra.txt' is not in the registered file list"):
        reg.local_path(other)


def test_s3_alias_lock_left_by_a_dead_writer_is_broken(bucket, tmp_path, monkeypatch):
    from lorafleet.registry import Registry, s3

    reg = Registry(f"s3://{bucket}/r")
    reg.register("m", make_adapter(tmp_path / "a", "a"), {})
    reg.register("m", make_adapter(tmp_path / "b", "b"), {})
    _s3().put_object(Bucket=bucket, Key=f"r/m/{s3.LOCK_OBJECT}", Body=b"dead-writer")
    monkeypatch.setattr(s3, "LOCK_STALE_S", 2.0)
    started = time.monotonic()
    reg.promote("m", "2")  # waits for the lock, then breaks it as stale
    # S3 stamps objects to the second, so "2 s old" may be seen after 1 s of real time.
    assert time.monotonic() - started >= 1.0 and reg.resolve("m").ref == "m@2"
    assert f"r/m/{s3.LOCK_OBJECT}" not in _keys(bucket, "r/m/")


def test_other_object_stores_are_a_clear_error():
    from lorafleet.registry import Registry, RegistryError

    with pytest.raises(RegistryError, match="only s3:// object stores are supported"):
        Registry("gs://bucket/registry")


# --- data ----------------------------------------------------------------------------------------------


def test_s3_data_files_are_read_and_errors_name_the_uri_and_line(bucket):
    from dataclasses import replace

    from lorafleet.data import DataError, read_split
    from lorafleet.tasks import get_task

    task = replace(get_task("classification"), labels=())  # any label: the user's own set
    _s3().upload_file(str(DATA / "user_feedback.jsonl"), bucket, "data/feedback.jsonl")
    examples = read_split(f"s3://{bucket}/data/feedback.jsonl", task, "train")
    local = read_split(str(DATA / "user_feedback.jsonl"), task, "train")
    assert [e.row for e in examples] == [e.row for e in local]
    assert examples[2].where == f"s3://{bucket}/data/feedback.jsonl:3"

    _s3().upload_file(str(DATA / "de_en.csv"), bucket, "data/de_en.csv")
    fields = {"text": "german", "translation": "english"}
    rows = read_split(f"s3://{bucket}/data/de_en.csv", get_task("translation"), "train", fields=fields)
    assert [e.row for e in rows] == [e.row for e in read_split(str(DATA / "de_en.csv"), get_task("translation"),
                                                                "train", fields=fields)]
    assert rows[0].where == f"s3://{bucket}/data/de_en.csv:2"  # line 1 is the header

    bad = b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n'
    _s3().put_object(Bucket=bucket, Key="data/bad.jsonl", Body=bad)
    with pytest.raises(DataError, match=rf"^s3://{bucket}/data/bad\.jsonl:3: not valid JSON"):
        read_split(f"s3://{bucket}/data/bad.jsonl", task, "train")
    with pytest.raises(DataError, match=rf"train data file not found: s3://{bucket}/data/missing\.jsonl"):
        read_split(f"s3://{bucket}/data/missing.jsonl", task, "train")


# --- the CLI on an s3 home ------------------------------------------------------------------------------


def test_adapters_cli_on_an_s3_home(bucket, tmp_path, home):
    from lorafleet.registry import Registry

    Registry(f"s3://{bucket}/home/registry").register("tickets", make_adapter(tmp_path / "a", "a"),
                                                      {"task": "classification", "method": "lora"})
    env = {**cli_env(home)}
    listed = json.loads(run_cli(["adapters", "list", "--home", f"s3://{bucket}/home", "--json"], env).stdout)
    assert [e["ref"] for e in listed] == ["tickets@1"] and listed[0]["path"] == f"s3://{bucket}/home/registry/tickets/1"
    # A local home with the registry elsewhere: LORAFLEET_REGISTRY.
    shown = run_cli(["adapters", "show", "tickets"], {**env, "LORAFLEET_REGISTRY": f"s3://{bucket}/home/registry"})
    assert json.loads(shown.stdout)["aliases"] == ["live"]
    # What needs local files says so, instead of writing a model into a path named s3:.
    refused = run_cli(["base", "build", "--home", f"s3://{bucket}/home"], env, check=False)
    assert refused.returncode == 2 and "needs a local home folder" in refused.stderr


# --- a run on s3: data in, checkpoints and the run's files there, killed driver resumed -------------------
# The suite's one `lorafleet train --resume` after a killed driver: a sharded FSDP full fine-tune, so the
# resume reads each rank's shards of the weights and optimizer state back (torch.distributed.checkpoint)
# from the object store. (A killed *worker* resumes within its run: test_fault_tolerance.py for DDP LoRA,
# test_fsdp.py for a sharded run.)

INTERVAL, MAX_STEPS = 10, 30
SMALL = ["--set", f"train.max_steps={MAX_STEPS}", "--set", f"train.eval_every={INTERVAL}", "--set", "train.log_every=1",
         "--set", "train.batch_size=4", "--set", "train.eval_samples=8", "--set", "scaling.num_workers=2",
         "--set", "method.name=full", "--set", "scaling.strategy=fsdp", "--set", "train.lr=5e-4"]


def _registered_steps(bucket: str, run: str) -> list[int]:
    try:
        body = _s3().get_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
        return [r["metrics"]["step"] for r in json.loads(body)["checkpoint_results"]]
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return []


def test_export_from_an_s3_registry_is_the_checked_copy(bucket, tmp_path):
    """`adapters export` reads an s3 version through the registry's verified copy: a tampered object is refused."""
    from lorafleet.export import export_artifact
    from lorafleet.registry import Registry, RegistryError

    reg = Registry(f"s3://{bucket}/registry")
    src = make_adapter(tmp_path / "a", "a")
    reg.register("m", src, {"task": "classification", "method": "lora", "base_model": "acme/base"})
    result = export_artifact(reg, "m", tmp_path / "out")
    out = Path(result.out)
    assert (out / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text()) == {"base_model_name_or_path": "acme/base", "r": 8,
                                                                     "tag": "a"}
    assert (out / "tokenizer" / "vocab.txt").is_file() and (out / "README.md").is_file()
    _s3().put_object(Bucket=bucket, Key="registry/m/1/adapter_model.safetensors", Body=b"tampered")
    with pytest.raises(RegistryError, match="does not match its sha256"):
        export_artifact(reg, "m", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_train_from_s3_data_into_an_s3_home_and_resume_a_killed_driver(bucket, home, base_model):
    data = f"s3://{bucket}/data/feedback.jsonl"
    _s3().upload_file(str(DATA / "user_feedback.jsonl"), bucket, "data/feedback.jsonl")
    s3_home = f"s3://{bucket}/home"
    run_name = f"s3-run-{uuid.uuid4().hex[:6]}"
    run = f"home/runs/{run_name}"
    env = cli_env(home)
    args = ["train", "configs/tiny/classification-lora.yaml", "--home", s3_home, "--quiet", "--json",
            "--set", f"model.name_or_path={base_model}", "--set", f"run.name={run_name}", "--set", "name=s3-tickets",
            "--set", f"data.train={data}", "--set", f"data.validation={data}", "--set", f"data.test={data}", *SMALL]
    proc = subprocess.Popen([LORAFLEET, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 400
    while not _registered_steps(bucket, run):
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}"
        assert time.time() < deadline, "no checkpoint registered in s3 within 400 s"
        time.sleep(0.1)
    registered = max(_registered_steps(bucket, run))
    stop_tree(proc, group=True)  # the driver and the local Ray it started, at once
    assert not _keys(bucket, "home/registry/"), "a half-trained run must not be registered"
    assert f"{run}/lorafleet-config.yaml" in _keys(bucket, run), "the run's config must be in the store to resume"

    out = run_cli(["train", "--resume", f"{s3_home}/runs/{run_name}", "--home", s3_home, "--quiet", "--json"], env)
    summary = last_json(out.stdout)
    assert summary["steps"] == MAX_STEPS and summary["registered"] == "s3-tickets@1" and summary["method"] == "full"
    assert summary["run_dir"] == f"{s3_home}/runs/{run_name}"
    log = [json.loads(line) for line in
           _s3().get_object(Bucket=bucket, Key=f"{run}/train_log.jsonl")["Body"].read().decode().splitlines()]
    first = [r for r in log if r["resumed_from"] is None]
    resumed = [r for r in log if r["resumed_from"] is not None]
    assert first and resumed and resumed[0]["resumed_from"] >= registered  # the log goes on across the kill
    assert max(r["step"] for r in resumed) == MAX_STEPS
    assert f"{run}/summary.json" in _keys(bucket, run)

    listed = json.loads(run_cli(["adapters", "list", "--home", s3_home, "--json"], env).stdout)
    assert [e["ref"] for e in listed] == ["s3-tickets@1"]
    assert listed[0]["metadata"]["run"] == f"{s3_home}/runs/{run_name}"
    # `lorafleet eval` of the s3 version (a checked local copy) scores what training scored.
    scored = last_json(run_cli(["eval", "s3-tickets", "--home", s3_home, "--json"], env).stdout)
    assert scored["metrics"] == summary["test_metrics"]

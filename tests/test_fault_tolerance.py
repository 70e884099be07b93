"""Failures: a killed training worker resumes from the last checkpoint (Ray Train FailureConfig),
and a killed driver is continued with `lorafleet train --resume RUN_DIR` (a sharded FSDP run).

A sharded run resumed after a killed worker trains on exactly what an uninterrupted run trains on:
test_fsdp.py, whose uninterrupted FSDP run is the reference. How these tests wait for a registered
checkpoint before killing: killed_runs.py.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from helpers import LORAFLEET, REPO, last_json, stop_tree
from killed_runs import start_cli, train_log, train_workers, wait_for_checkpoint

pytestmark = pytest.mark.slow

INTERVAL, MAX_STEPS = 20, 60
SMALL = [
    "--set", f"train.max_steps={MAX_STEPS}", "--set", f"train.eval_every={INTERVAL}", "--set", "train.log_every=1",
    "--set", "train.eval_samples=16", "--set", "train.batch_size=8",
    "--set", "data.synthetic_sizes={train: 400, validation: 16, test: 32}",
    "--set", "scaling.num_workers=2", "--set", "scaling.max_failures=1",
]


def test_killed_worker_resumes_from_last_checkpoint(env, home):
    run_name = f"kill-worker-{uuid.uuid4().hex[:6]}"
    run_dir = home / "runs" / run_name
    # Steps take ~0.05 s here, so 20 of them are shorter than Ray's default 2 s poll and a checkpoint
    # could be registered only after the next was reported. Polling every 0.25 s leaves a
    # window in which the newest reported checkpoint is registered: the case this test pins down.
    env = {**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    proc = start_cli(["train", "configs/tiny/classification-lora.yaml", "--quiet", "--json",
                   "--set", f"run.name={run_name}", "--set", "name=kill-worker", *SMALL], env)
    registered = wait_for_checkpoint(proc, run_dir, interval=INTERVAL, max_steps=MAX_STEPS, before_next=True)
    workers = train_workers(proc)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    workers[-1].kill()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == MAX_STEPS and summary["registered"] == "kill-worker@1"

    log = train_log(run_dir)
    first = [r for r in log if r["resumed_from"] is None]
    resumed = [r for r in log if r["resumed_from"] is not None]
    assert resumed, "the run never restarted: was the worker really killed?"
    restart_step = resumed[0]["resumed_from"]
    assert restart_step >= registered, (restart_step, registered)
    reached = max(r["step"] for r in first)
    assert reached - restart_step <= INTERVAL, f"redid {reached - restart_step} steps (> {INTERVAL})"
    assert max(r["step"] for r in resumed) == MAX_STEPS


def test_killed_driver_continues_with_resume(env, home):
    # Sharded full fine-tuning here (the killed-worker test above covers LoRA under DDP): resuming
    # reads each rank's shards of the weights and optimizer state back (torch.distributed.checkpoint).
    run_name = f"kill-driver-{uuid.uuid4().hex[:6]}"
    run_dir = home / "runs" / run_name
    proc = start_cli(["train", "configs/tiny/classification-lora.yaml", "--quiet",
                   "--set", f"run.name={run_name}", "--set", "name=kill-driver", *SMALL,
                   "--set", "method.name=full", "--set", "scaling.strategy=fsdp", "--set", "train.lr=5e-4"], env)
    registered = wait_for_checkpoint(proc, run_dir, interval=INTERVAL, max_steps=MAX_STEPS)
    stop_tree(proc, group=True)  # the driver and the local Ray it started, at once
    assert not (home / "registry" / "kill-driver").exists(), "a half-trained run must not be registered"

    out = subprocess.run([LORAFLEET, "train", "--resume", str(run_dir), "--quiet", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = last_json(out.stdout)
    assert summary["steps"] == 60 and summary["registered"] == "kill-driver@1" and summary["method"] == "full"
    resumed = [r for r in train_log(run_dir) if r["resumed_from"] is not None]
    assert resumed and resumed[0]["resumed_from"] >= registered


def test_reusing_a_run_folder_needs_resume(env, home):
    run_dir = home / "runs" / "taken"
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([LORAFLEET, "train", "configs/tiny/classification-lora.yaml", "--set", "run.name=taken"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--resume" in proc.stderr

"""Failures: a killed training worker resumes from the last checkpoint (Ray Train FailureConfig), and a
run folder is reused only with `--resume`.

A sharded run resumed after a killed worker trains on exactly what an uninterrupted run trains on:
test_fsdp.py, whose uninterrupted FSDP run is the reference. A killed driver continued with
`lorafleet train --resume RUN_DIR` (a sharded FSDP run, its checkpoints in an object store):
test_s3.py. How these tests wait for a registered
checkpoint before killing: killed_runs.py.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from helpers import LORAFLEET, REPO
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


def test_reusing_a_run_folder_needs_resume(env, home):
    run_dir = home / "runs" / "taken"
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([LORAFLEET, "train", "configs/tiny/classification-lora.yaml", "--set", "run.name=taken"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--resume" in proc.stderr

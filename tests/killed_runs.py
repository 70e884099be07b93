"""Helpers for the tests that kill a training run and resume it (test_fault_tolerance.py, test_fsdp.py).

Ray registers a checkpoint only once every worker has reported it, so these tests kill only after the
checkpoint shows up in Ray's checkpoint_manager_snapshot.json: the bound we promise is "at most one
checkpoint interval redone after the last *registered* checkpoint" (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil

from helpers import LORAFLEET, REPO

__all__ = ["checkpoint_dir", "logged_step", "registered_steps", "start_cli", "train_log", "train_workers",
           "wait_for_checkpoint"]


def registered_steps(run_dir: Path) -> list[int]:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [r["metrics"]["step"] for r in results]


def logged_step(run_dir: Path) -> int:
    """The last step rank 0 finished (train_log.jsonl gets a line per step with log_every=1)."""
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue  # being written
    return 0


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, *, interval: int, max_steps: int,
                        before_next: bool = False, timeout: float = 400) -> int:
    """Wait until Ray has registered a checkpoint; return the newest registered step.

    With ``before_next``, also wait until that is the newest checkpoint the run reported: rank 0 is
    still a few steps short of the next one (checkpoints every ``interval`` steps). A kill then is the
    bound's first case (docs/RELIABILITY.md); killed between a report and its registration, the run
    would resume from the checkpoint before, which is the second case, and redo more.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}"
        newest = max(registered_steps(run_dir), default=None)
        if newest is not None and not before_next:
            return newest
        if newest is not None and newest < max_steps and logged_step(run_dir) <= newest + interval - 3:
            return newest
        time.sleep(0.02 if before_next else 0.1)
    raise AssertionError(f"no checkpoint registered{' before the next was reported' if before_next else ''} "
                         f"in {run_dir} within {timeout}s")


def train_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    # Only this run's workers: descendants of our CLI process (other Rays may run on the machine).
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()) or "RayTrainWorker" in child.name():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([LORAFLEET, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint Ray registered at `step`."""
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    return run_dir / next(r["checkpoint_dir_name"] for r in snap if r["metrics"]["step"] == step)

"""Shared fixtures: one lorafleet home with the tiny base model, one local Ray per test session.

The tiny base model is built once by `make test` (into $LORAFLEET_HOME/models/tiny); a test
session started some other way builds it itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LORAFLEET = str(VENV_BIN / "lorafleet")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def built_base() -> Path:
    """The pre-trained tiny base model (built if missing)."""
    home = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")).resolve()
    base = home / "models" / "tiny"
    if not (base / "config.json").exists():
        subprocess.run([LORAFLEET, "base", "build", "--out", str(base)], check=True, cwd=REPO)
    return base


@pytest.fixture(scope="session")
def base_model() -> Path:
    return built_base()


@pytest.fixture(scope="session")
def home(tmp_path_factory, base_model) -> Path:
    """A private lorafleet home for the session: its own runs/ and registry/, the shared base model."""
    h = tmp_path_factory.mktemp("home")
    (h / "models").mkdir()
    (h / "models" / "tiny").symlink_to(base_model)
    return h


def cli_env(home: Path) -> dict[str, str]:
    """Environment for running the CLI/jobs as a user would, against ``home``."""
    e = dict(os.environ)
    e["LORAFLEET_HOME"] = str(home)
    e.pop("RAY_ADDRESS", None)  # each CLI run starts its own private local Ray
    return e


@pytest.fixture
def env(home) -> dict[str, str]:
    return cli_env(home)


# The generative configs with fewer steps and smaller splits, to keep the suite short.
FEWER_STEPS = [
    "--set", "train.max_steps=150", "--set", "train.eval_every=75", "--set", "train.eval_samples=16",
    "--set", "data.synthetic_sizes={train: 2000, validation: 16, test: 40}",
]
TASK_RUNS = {  # task -> (shipped config, registered name, overrides)
    "classification": ("configs/tiny/classification-lora.yaml", "tickets-accept", []),
    "summarization": ("configs/tiny/summarization-lora.yaml", "summarization-accept", FEWER_STEPS),
    "translation": ("configs/tiny/translation-lora.yaml", "translation-accept", FEWER_STEPS),
    "qa": ("configs/tiny/qa-lora.yaml", "qa-accept", FEWER_STEPS),
}


@pytest.fixture(scope="session")
def trained(home):
    """``trained(task)`` -> (untuned base metrics, `lorafleet train --json` summary), both through
    the CLI as a user runs them, into the session's registry. Each task trains once per session:
    the task-adapter acceptance tests and the serving tests share the adapters."""
    cache: dict[str, tuple[dict, dict]] = {}

    def get(task: str) -> tuple[dict, dict]:
        if task not in cache:
            config, name, overrides = TASK_RUNS[task]
            e = cli_env(home)
            base = last_json(run_cli(["eval", "base", "--config", config, "--json", *overrides], e).stdout)["metrics"]
            summary = last_json(run_cli(["train", config, "--quiet", "--json", "--set", f"name={name}", *overrides],
                                        e, timeout=900).stdout)
            cache[task] = (base, summary)
        return cache[task]

    return get


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One private local Ray instance for in-process tests (never attaches to another Ray)."""
    import ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=4, include_dashboard=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `lorafleet ARGS` in the repo root, the way a user does."""
    proc = subprocess.run([LORAFLEET, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lorafleet {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc

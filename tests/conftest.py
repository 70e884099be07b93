"""Shared fixtures: one lorafleet home with the tiny base model, one local Ray per test session.

The tiny base model is built once by `make test` (into $LORAFLEET_HOME/models/tiny); a test
session started some other way builds it itself.
"""

from __future__ import annotations

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


@pytest.fixture
def env(home) -> dict[str, str]:
    """Environment for running the CLI/jobs as a user would, against the session's home."""
    e = dict(os.environ)
    e["LORAFLEET_HOME"] = str(home)
    e.pop("RAY_ADDRESS", None)  # each CLI run starts its own private local Ray
    return e


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

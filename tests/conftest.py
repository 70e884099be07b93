"""Shared fixtures (one lorafleet home with the tiny base model, one local Ray per test session, that
is per pytest worker) and how `make test` splits the suite over two workers.

Plain helpers (run_cli, cli_env, free_port, stop_tree, ...) live in helpers.py: import them from
there, never from this file. The tiny base model is built once by `make test` (into
$LORAFLEET_HOME/models/tiny); a test session started some other way builds it itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO, built_base, cli_env, last_json, run_cli

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# `make test` runs the suite on two pytest workers (pytest-xdist, `-n 2 --dist loadscope`): the slow
# tests leave a core idle about a third of the time (Ray and vLLM start-up, polls, HTTP round trips; 68%
# busy on average over the training modules, sampled from /proc/stat). Each group below runs whole on
# one worker, in collection order:
# * a module is a group, so its module-scoped fixtures (a served stack, a trained ladder) start once;
# * the modules that share the session's `trained` adapters are one group, "serving": the adapters
#   train once per worker, so they stay on one. It is the longest group, so it is queued first.
#   (test_smollm2 serves too, from its own adapter: two local `lorafleet serve` run side by side, each
#   with its own ports, Ray Serve's fallback proxy included.)
# * then the longest modules, longest first (durations of a fresh `make test`), so that the short ones
#   fill the end and neither worker idles while the other finishes a long module.
# (xdist's own `xdist_group` marks do nothing under pytest 9: xdist 3.8 sets `item._nodeid`, which
# pytest 9 no longer has. Hence a scheduler whose scope is the group.)
SERVING_GROUP = {"test_task_adapters", "test_serving", "test_serving_separate", "test_serving_replicas"}
LONGEST_FIRST = ["test_smollm2", "test_compare", "test_sweep", "test_predict", "test_fsdp", "test_fault_tolerance", "test_s3",
                 "test_dtype", "test_user_data", "test_cluster"]


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "serving" if Path(module).stem in SERVING_GROUP else module


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (a dev dependency): ignored without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope":
        return None  # xdist's own scheduler for any other mode
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupScheduling(config, log)


def _queue_position(item: pytest.Item) -> int:
    group = _group(item.nodeid)
    if group == "serving":
        return 0
    stem = Path(group).stem
    return 1 + (LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_queue_position)  # stable: the order within a group stays


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
    return cli_env(home)


# The generative configs with fewer steps and smaller splits, to keep the suite short.
FEWER_STEPS = [
    "--set", "train.max_steps=150", "--set", "train.eval_every=75", "--set", "train.eval_samples=16",
    "--set", "data.synthetic_sizes={train: 2000, validation: 16, test: 40}",
]
# The summarization adapter trains sharded (FSDP2 LoRA, issue 30): every serving test then serves an
# FSDP2-trained adapter and checks it token for token against transformers+peft, and its validation runs
# generation on the sharded model (which once failed: "got mixed torch.Tensor and DTensor"). Its metrics
# equal the DDP run's (rougeL 0.2031 both, 2026-12-07); it costs ~10% more CPU.
SHARDED = ["--set", "scaling.strategy=fsdp"]
# translation and qa on one worker with the two workers' batch: the same rows per step, one Ray Train worker
# process fewer (75 vs 101 CPU-s for the translation run, chrF 0.142 vs 0.115; qa token F1 0.15; the untuned
# base scores 0.0 on both; 2026-12-07). Two workers are what the classification and summarization runs test.
ONE_WORKER = ["--set", "scaling.num_workers=1", "--set", "train.batch_size=32"]
TASK_RUNS = {  # task -> (shipped config, registered name, overrides)
    "classification": ("configs/tiny/classification-lora.yaml", "tickets-accept", []),
    "summarization": ("configs/tiny/summarization-lora.yaml", "summarization-accept", FEWER_STEPS + SHARDED),
    "translation": ("configs/tiny/translation-lora.yaml", "translation-accept", FEWER_STEPS + ONE_WORKER),
    "qa": ("configs/tiny/qa-lora.yaml", "qa-accept", FEWER_STEPS + ONE_WORKER),
}


@pytest.fixture(scope="session")
def trained(home):
    """``trained(task)`` -> (untuned base metrics, `lorafleet train --json` summary), the training
    through the CLI as a user runs it, into the session's registry; the base scored in-process with
    the function `lorafleet eval base` calls (a process fewer per task). Each task trains once per
    session: the task-adapter acceptance tests and the serving tests share the adapters."""
    from lorafleet.evaluate import evaluate_artifact

    cache: dict[str, tuple[dict, dict]] = {}

    def get(task: str) -> tuple[dict, dict]:
        if task not in cache:
            config, name, overrides = TASK_RUNS[task]
            e = cli_env(home)
            dotted = [kv for kv in overrides if kv != "--set"]
            base = evaluate_artifact("base", config=str(REPO / config), overrides=dotted, home=home)["metrics"]
            summary = last_json(run_cli(["train", config, "--quiet", "--json", "--set", f"name={name}", *overrides],
                                        e, timeout=900).stdout)
            cache[task] = (base, summary)
        return cache[task]

    return get


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback for the session (per pytest worker), started without
    waiting; `mlflow_server.uri` to log to, `mlflow_server.client()` (waits for it) to read back."""
    from helpers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One private local Ray instance for in-process tests (never attaches to another Ray)."""
    import ray

    from lorafleet.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)  # what the CLI starts: a private local Ray with lorafleet's settings
    yield ray
    ray.shutdown()


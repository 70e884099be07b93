"""What every training run shares, whoever starts it (`finetune()`, a sweep trial, a compare rung):
Ray, where the run lives, its data, scoring a checkpoint on the test split, and registering the
artifact with the same metadata.

A run folder holds the resolved config (`lorafleet-config.yaml`, written before training), Ray
Train's checkpoints, `train_log.jsonl`, the best checkpoint's model (`artifact/`) and
`summary.json`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import yaml

from lorafleet.config import FinetuneConfig, dump_config, read_yaml, validate
from lorafleet.uri import exists, is_uri, join, parent_and_name, read_text, write_text

__all__ = [
    "ARTIFACT_DIR",
    "CONFIG_FILE",
    "RunPlace",
    "RunSummary",
    "dir_bytes",
    "init_ray",
    "load_splits",
    "place_run",
    "read_rows",
    "register_artifact",
    "resolve_labels",
    "run_dir_config",
    "run_metadata",
    "score_checkpoint",
    "score_model_dir",
    "task_labels",
]

CONFIG_FILE = "lorafleet-config.yaml"  # the resolved config, saved in the run folder before training
ARTIFACT_DIR = "artifact"  # the best checkpoint's model, inside a local run folder


@dataclass
class RunSummary:
    """What a finished run produced."""

    run_name: str
    run_dir: str
    method: str
    task: str
    test_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    wall_time_s: float
    steps: int
    artifact_dir: str | None = None  # the best checkpoint's model: <run_dir>/artifact for a local run
    peak_memory_mb: float = 0.0  # rank 0's peak (RSS on CPU, max allocated on GPU)
    tokens_per_s: float = 0.0  # mean over the logged windows
    artifact_bytes: int = 0
    worker_nodes: list[str] = field(default_factory=list)  # Ray node id of each rank
    registered: str | None = None  # "name@version"
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


# --- Ray ----------------------------------------------------------------------------------------


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.2"  # seconds; see init_ray


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a private local instance.

    A bare `ray.init()` would silently attach to any Ray already running on this machine. Locally
    the dashboard gets a known port and every Ray process gets `RAY_API_SERVER_ADDRESS` pointing at
    it: Ray Train's PlacementGroupCleaner finds the cluster through the state API, and with several
    Ray instances on one machine its auto-detection fails ("Found multiple active Ray instances"),
    so a finished (or ASHA-stopped) run's CPUs never come back. Tune with the dashboard off
    deadlocked (docs/SWEEPS.md).

    Locally Ray Train's controller also polls its workers every 0.2 s instead of every 2 s
    (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, unless set): worker-group start, each `report()` and the end
    of a run wait for a poll, and a 60-step run spent ~4 s of its ~21 s in those waits (the 7-rung
    classification ladder, 121 s -> 104 s, same metrics, 2 CPU cores). A cluster keeps Ray's 2 s.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        port = _free_port()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S),
            }},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- where the run lives ----------------------------------------------------------------------------


@dataclass
class RunPlace:
    """A run's name and folder (`dir` is None when `storage` is object storage, s3://...)."""

    cfg: FinetuneConfig  # with run.storage_path pointing at the resumed folder's parent, if resumed
    name: str
    storage: str
    dir: Path | None

    @property
    def location(self) -> str | Path:
        """The run folder: `dir`, or `<storage>/<name>` in an object store (where Ray Train writes too)."""
        return self.dir if self.dir is not None else join(self.storage, self.name)

    def file(self, name: str) -> str:
        """Where the run's own file `name` goes (config, log, summary), beside Ray Train's checkpoints."""
        return str(join(self.location, name))

    def save_config(self) -> None:
        """Save the resolved config in the run folder before training: what `--resume` reads back."""
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.file(CONFIG_FILE), dump_config(self.cfg))


def place_run(cfg: FinetuneConfig, resume_dir: str | Path | None = None) -> RunPlace:
    """Where a run lives. A fresh run always gets a unique name: reusing (name, storage_path) makes
    Ray Train resume the old run, which only an explicit `resume_dir` (--resume, or a sweep trial
    restarted by Tune) may do."""
    cfg = resolve_labels(cfg)  # the run's config names its label set (user data without task.labels)
    if resume_dir is not None:
        storage, name = parent_and_name(resume_dir)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage})})
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        name = cfg.run.name or f"{cfg.name}-{stamp}"
        storage = cfg.run.storage_path
    run_dir = Path(storage) / name if not is_uri(storage) else None
    if run_dir is not None and resume_dir is None and run_dir.exists():
        raise FileExistsError(f"run folder {run_dir} exists; use `lorafleet train --resume {run_dir}` to continue it")
    return RunPlace(cfg, name, storage, run_dir)


def run_dir_config(run_dir: str | Path) -> FinetuneConfig:
    """The resolved config saved in a run folder, local or s3://... (for --resume)."""
    path = join(run_dir, CONFIG_FILE)
    if not exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lorafleet run folder (…/runs/<run-name>)?")
    raw = yaml.safe_load(read_text(path)) if is_uri(path) else read_yaml(path, "run config")
    return validate(FinetuneConfig, raw, str(path))


# --- data ---------------------------------------------------------------------------------------------


def resolve_labels(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with `task.labels` filled in from the training split when a classification run on the
    user's data names none: its distinct labels, sorted. The resolved labels then travel with the
    run's config (workers, checkpoints, registry metadata), so every prompt lists the same labels.
    Synthetic data keeps the synthetic task's own labels (and `task.labels` stays unset)."""
    from dataclasses import replace

    from lorafleet.data import DataError, read_split
    from lorafleet.tasks import get_task

    if cfg.task.name != "classification" or cfg.task.labels or cfg.data.train == "synthetic":
        return cfg
    open_set = replace(get_task(cfg.task), labels=())  # any label passes while the set is collected
    examples = read_split(cfg.data.train, open_set, "train", fields=cfg.data.fields, seed=cfg.data.seed)
    labels = sorted({open_set.target(ex.row) for ex in examples})
    if len(labels) < 2:
        raise DataError(f"{cfg.data.train}: the training split has only the label(s) {labels}; a classifier "
                        "needs at least 2 (or list them in task.labels)")
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"labels": labels})})


def task_labels(cfg: FinetuneConfig):
    """(task, labels): the config's task, configured, and its label set (`task.labels`, else the
    training split's, else the synthetic task's; None for generative tasks)."""
    from lorafleet.tasks import get_task

    task = get_task(resolve_labels(cfg).task)
    return task, list(task.labels) or None


def read_rows(cfg: FinetuneConfig, split: str) -> list[dict[str, Any]]:
    """One split's rows, read exactly as training and `lorafleet eval` read them."""
    from lorafleet.data import read_split

    task, _ = task_labels(cfg)
    examples = read_split(getattr(cfg.data, split), task, split, fields=cfg.data.fields,
                          synthetic_n=cfg.data.synthetic_sizes.get(split), seed=cfg.data.seed)
    return [ex.row for ex in examples]


def load_splits(cfg: FinetuneConfig, tokenizer, labels: list[str] | None) -> dict[str, Any]:
    """Read, validate and encode all splits on the driver, so bad data fails before any worker starts."""
    from lorafleet.data import encode_rows, read_split

    task, _ = task_labels(cfg)
    sizes = cfg.data.synthetic_sizes
    splits = {
        split: read_split(
            getattr(cfg.data, split), task, split, fields=cfg.data.fields,
            synthetic_n=sizes.get(split), seed=cfg.data.seed,
        )
        for split in ("train", "validation", "test")
    }
    head_labels = labels if cfg.method.name == "head" else None
    encoded = encode_rows(tokenizer, task, splits["train"], cfg.data.max_seq_len, head_labels=head_labels)
    encode_rows(tokenizer, task, splits["validation"] + splits["test"], cfg.data.max_seq_len)  # length check
    return {"examples": splits, "train_encoded": encoded}


# --- scoring and registering --------------------------------------------------------------------------


def score_model_dir(model_dir: str | Path, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                    labels: list[str] | None) -> dict[str, float]:
    """The task's metrics for a saved model folder on `rows`, computed as `lorafleet eval` computes
    them (same loader, dtype and device), so re-evaluating a registered version gives the same number."""
    from lorafleet.evaluate import evaluate_rows, load_for_eval, run_device

    model, tok, _ = load_for_eval(Path(model_dir), cfg.model.name_or_path, cfg.model.dtype,
                                  run_device(cfg.scaling.use_gpu))
    return evaluate_rows(model, tok, task_labels(cfg)[0], rows, labels)


def score_checkpoint(checkpoint: Any, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                     labels: list[str] | None) -> dict[str, float]:
    """`score_model_dir` for a Ray Train checkpoint's model (the test split, for the artifact)."""
    from lorafleet.train import MODEL_DIR

    with checkpoint.as_directory() as d:
        return score_model_dir(Path(d) / MODEL_DIR, cfg, rows, labels)


def dir_bytes(path: str | Path | None) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_metadata(cfg: FinetuneConfig, summary: RunSummary, labels: list[str] | None) -> dict[str, Any]:
    """The registry metadata of a run's artifact: what it is, how it scored, and its config.

    Serving reads `labels` (classification) and `source_lang`/`target_lang` (translation) from it, and
    refuses the artifact on a base whose fingerprint differs from `base_fingerprint`
    (`base_model.base_fingerprint`: config.json, weights index, weight file names, sizes and samples).
    """
    from lorafleet.base_model import base_fingerprint
    from lorafleet.tasks import get_task

    task = get_task(cfg.task)
    languages = {"source_lang": task.source_lang, "target_lang": task.target_lang} if cfg.task.name == "translation" else {}
    return {
        "base_model": cfg.model.name_or_path,
        "base_fingerprint": base_fingerprint(cfg.model.name_or_path),
        "task": cfg.task.name,
        "method": cfg.method.name,
        "labels": labels,
        **languages,
        "metrics": {"test": summary.test_metrics},
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "wall_time_s": summary.wall_time_s,
        "steps": summary.steps,
        "run": summary.run_dir,
        "config": cfg.model_dump(mode="json"),
    }


def register_artifact(registry_root: str | Path, name: str, model_dir: str | Path, metadata: dict[str, Any],
                      promote: bool = False) -> str:
    """Register `model_dir` (atomically) under `name`; returns its ref, "name@version".

    Metadata naming a `base_model` but no `base_fingerprint` gets it here, so every artifact records
    the base it was trained on (serving checks it; see `run_metadata`)."""
    from lorafleet.base_model import base_fingerprint
    from lorafleet.registry import Registry

    if metadata.get("base_model") and not metadata.get("base_fingerprint"):
        metadata = {**metadata, "base_fingerprint": base_fingerprint(metadata["base_model"])}
    return Registry(registry_root).register(name, model_dir, metadata, promote=promote).ref

"""The fine-tuning flow, top to bottom: config -> data -> Ray Train -> test metrics -> registry.

`jobs/finetune.py` (for `ray job submit`) and `lorafleet train` both call `finetune()`.
"""

from __future__ import annotations

import json
import os
import socket
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import yaml

from lorafleet.base_model import load_tokenizer
from lorafleet.config import FinetuneConfig, dump_config, parse_config
from lorafleet.data import DataError, encode_rows, read_split
from lorafleet.evaluate import evaluate_rows, load_for_eval
from lorafleet.registry import Registry
from lorafleet.tasks import get_task
from lorafleet.train import MODEL_DIR, build_dataset, build_trainer

ARTIFACT_DIR = "artifact"

__all__ = ["RunSummary", "finetune", "init_ray", "load_splits", "run_dir_config", "CONFIG_FILE"]

CONFIG_FILE = "lorafleet-config.yaml"  # the resolved config, saved in the run folder before training


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


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a private local instance.

    A bare `ray.init()` would silently attach to any Ray already running on this machine. Locally
    the dashboard gets a known port and every Ray process gets `RAY_API_SERVER_ADDRESS` pointing at
    it: Ray Train's PlacementGroupCleaner finds the cluster through the state API, and with several
    Ray instances on one machine its auto-detection fails ("Found multiple active Ray instances"),
    so a finished (or ASHA-stopped) run's CPUs never come back. Tune with the dashboard off
    deadlocked (docs/SWEEPS.md).
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
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_splits(cfg: FinetuneConfig, tokenizer, labels: list[str] | None) -> dict[str, Any]:
    """Read, validate and encode all splits on the driver, so bad data fails before any worker starts."""
    task = get_task(cfg.task.name)
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


def run_dir_config(run_dir: str | Path) -> FinetuneConfig:
    """The resolved config saved in a run folder (for --resume)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lorafleet run folder (…/runs/<run-name>)?")
    return FinetuneConfig.model_validate(yaml.safe_load(path.read_text()))


def _drain_progress(queue, total_steps: int, stop: threading.Event, history: list[dict[str, Any]], metric: str, show: bool):
    """Collect rank 0's step records into `history`; with `show`, draw a live progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, transient=False, disable=not show) as bar:
        t = bar.add_task("train", total=total_steps, info="starting workers…")
        last_metric = ""
        while not (stop.is_set() and queue.empty()):
            try:
                rec = queue.get(timeout=0.5)
            except Exception:
                continue
            history.append(rec)
            if metric in rec:
                last_metric = f" {metric}={rec[metric]:.3f}"
            bar.update(t, completed=rec["step"], info=f"loss={rec['loss']:.3f}{last_metric}")


def finetune(
    cfg: FinetuneConfig,
    *,
    registry_root: str | Path,
    resume_dir: str | Path | None = None,
    progress: bool = True,
) -> RunSummary:
    """Train `cfg` on Ray, score the best checkpoint on the test split, register it.

    Args:
        cfg: a resolved config (see `lorafleet.config.load_config`).
        registry_root: where the artifact is registered.
        resume_dir: a run folder of an interrupted run (driver died): continue it.
        progress: show a live progress bar on the driver.
    """
    started = time.time()
    task = get_task(cfg.task.name)
    labels = list(cfg.task.labels or task.labels) or None

    # 1. Where the run lives. A fresh run always gets a unique name: reusing (name, storage_path)
    #    makes Ray Train resume the old run, which only --resume should do.
    if resume_dir is not None:
        resume_dir = Path(resume_dir).resolve()
        run_name, storage = resume_dir.name, str(resume_dir.parent)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": storage})})
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        run_name = cfg.run.name or f"{cfg.name}-{stamp}"
        storage = cfg.run.storage_path
    local_storage = "://" not in storage
    run_dir = Path(storage) / run_name if local_storage else None
    if run_dir is not None and resume_dir is None and run_dir.exists():
        raise FileExistsError(f"run folder {run_dir} exists; use `lorafleet train --resume {run_dir}` to continue it")

    # 2. Data: read, validate and tokenize everything before any worker starts.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data = load_splits(cfg, tokenizer, labels)
    val_rows = [ex.row for ex in data["examples"]["validation"]]
    test_rows = [ex.row for ex in data["examples"]["test"]]

    init_ray()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(dump_config(cfg))

    # 3. The feature-based baseline trains no torch weights: embeddings + logistic regression.
    if cfg.method.name == "feature":
        return _feature_baseline(cfg, data, labels, run_name, str(run_dir or storage), registry_root, started)

    # 4. Train on Ray, with a live progress display fed by rank 0.
    from ray.util.queue import Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    history: list[dict[str, Any]] = []
    metric_key = f"val_{task.primary_metric}"
    stop = threading.Event()
    drainer = threading.Thread(
        target=_drain_progress, args=(queue, cfg.train.max_steps, stop, history, metric_key, progress), daemon=True
    )
    drainer.start()
    trainer = build_trainer(
        cfg,
        build_dataset(data["train_encoded"], tokenizer.pad_token_id),
        run_name=run_name,
        val_rows=val_rows,
        labels=labels,
        progress_queue=queue,
        log_path=str(run_dir / "train_log.jsonl") if run_dir else None,
    )
    try:
        result = trainer.fit()
    finally:
        stop.set()
        drainer.join(timeout=5)
    if result.error:
        raise result.error

    # 5. The best checkpoint by validation metric is the artifact; score it on the test split.
    best = result.get_best_checkpoint(metric_key, task.mode) if task.name != "text" else result.checkpoint
    best = best or result.checkpoint
    final = result.metrics or {}
    # The artifact stays with its run (a local run folder), so nothing is left behind in /tmp;
    # with object storage it is copied to a temporary folder that the caller owns.
    artifact_root = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))
    model_dir = artifact_root / ARTIFACT_DIR
    with best.as_directory() as d:
        shutil.rmtree(model_dir, ignore_errors=True)  # a resumed run replaces its old artifact
        shutil.copytree(Path(d) / MODEL_DIR, model_dir)
    test_metrics: dict[str, float] = {}
    if task.name != "text":
        if cfg.scaling.use_gpu:  # a GPU run is scored on a GPU (the driver may have none), from storage
            score = ray.remote(num_gpus=1, num_cpus=cfg.scaling.cpus_per_worker)(score_checkpoint)
            test_metrics = ray.get(score.remote(best, cfg, test_rows, labels))
        else:
            test_metrics = score_checkpoint(best, cfg, test_rows, labels)

    summary = RunSummary(
        run_name=run_name,
        run_dir=str(run_dir or f"{storage}/{run_name}"),
        method=cfg.method.name,
        task=task.name,
        test_metrics=test_metrics,
        trainable_params=int(final.get("trainable_params", 0)),
        total_params=int(final.get("total_params", 0)),
        wall_time_s=round(time.time() - started, 2),
        steps=int(final.get("step", 0)),
        artifact_dir=str(model_dir),
        peak_memory_mb=round(float(final.get("peak_memory_mb", 0.0)), 1),
        tokens_per_s=round(_mean([h["tokens_per_s"] for h in history if "tokens_per_s" in h]), 1),
        artifact_bytes=sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()),
        history=history,
        worker_nodes=next((h["worker_nodes"] for h in history if "worker_nodes" in h), []),
    )
    # 6. Register (atomically) only a run that finished; a failed run raised above.
    if cfg.register_artifact and task.name != "text":
        entry = Registry(registry_root).register(cfg.name, model_dir, _metadata(cfg, summary, labels))
        summary.registered = entry.ref
    if run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
    return summary


def score_checkpoint(checkpoint: Any, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                     labels: list[str] | None) -> dict[str, float]:
    """The task's metrics for a Ray Train checkpoint's model on ``rows`` (the test split)."""
    import torch

    with checkpoint.as_directory() as d:
        model, tok, _ = load_for_eval(Path(d) / MODEL_DIR, cfg.model.name_or_path)
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        model = model.to("cuda")
    return evaluate_rows(model, tok, get_task(cfg.task.name), rows, labels)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _metadata(cfg: FinetuneConfig, summary: RunSummary, labels: list[str] | None) -> dict[str, Any]:
    return {
        "base_model": cfg.model.name_or_path,
        "task": cfg.task.name,
        "method": cfg.method.name,
        "labels": labels,
        "metrics": {"test": summary.test_metrics},
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "wall_time_s": summary.wall_time_s,
        "steps": summary.steps,
        "run": summary.run_dir,
        "config": cfg.model_dump(mode="json"),
    }


def _feature_baseline(cfg, data, labels, run_name, run_dir, registry_root, started) -> RunSummary:
    """Frozen-model features + logistic regression, run as one Ray task on the cluster."""

    # max_calls=1: a fresh worker process, so its peak RSS is this run's alone.
    @ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0, max_calls=1)
    def fit_features(cfg_json: dict, train_rows: list[dict], test_rows: list[dict], labels: list[str]):
        import numpy as np
        from safetensors.numpy import save
        from sklearn.linear_model import LogisticRegression

        from lorafleet.base_model import load_model, load_tokenizer
        from lorafleet.data import prompt_ids
        from lorafleet.evaluate import mean_pooled_features

        c = FinetuneConfig.model_validate(cfg_json)
        task = get_task(c.task.name)
        tok = load_tokenizer(c.model.name_or_path)
        model = load_model(c.model.name_or_path, c.model.dtype)

        featurized = {"tokens": 0, "seconds": 0.0}

        def feats(rows):
            ids = [prompt_ids(tok, task.instruction(r)) for r in rows]
            t0 = time.perf_counter()
            out = mean_pooled_features(model, tok, ids).numpy()
            featurized["seconds"] += time.perf_counter() - t0
            featurized["tokens"] += sum(len(x) for x in ids)
            return out

        y = [labels.index(task.target(r).strip()) for r in train_rows]
        clf = LogisticRegression(max_iter=2000).fit(feats(train_rows), y)
        preds = [labels[i] for i in clf.predict(feats(test_rows))]
        import resource

        measured = {  # the same measures as the Ray Train methods report
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "tokens_per_s": featurized["tokens"] / max(featurized["seconds"], 1e-9),
        }
        # The classifier is a few KiB: it travels back as bytes, since this task may run on
        # another node than the driver that writes the artifact.
        files = {
            "feature.safetensors": save(
                {"coef": clf.coef_.astype(np.float32), "intercept": clf.intercept_.astype(np.float32)}
            ),
            "feature.json": json.dumps({"labels": labels, "base_model": c.model.name_or_path}).encode(),
        }
        trainable = int(clf.coef_.size + clf.intercept_.size)
        total = trainable + sum(p.numel() for p in model.parameters())
        return task.score(preds, test_rows), trainable, total, files, measured

    train_rows = [ex.row for ex in data["examples"]["train"]]
    test_rows = [ex.row for ex in data["examples"]["test"]]
    metrics, trainable, total, files, measured = ray.get(
        fit_features.remote(cfg.model_dump(mode="json"), train_rows, test_rows, labels)
    )
    local = "://" not in run_dir
    model_dir = (Path(run_dir) if local else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))) / ARTIFACT_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    for fname, blob in files.items():
        (model_dir / fname).write_bytes(blob)
    summary = RunSummary(run_name, run_dir, "feature", cfg.task.name, metrics, trainable, total,
                         round(time.time() - started, 2), 0, str(model_dir),
                         peak_memory_mb=round(measured["peak_memory_mb"], 1),
                         tokens_per_s=round(measured["tokens_per_s"], 1),
                         artifact_bytes=sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file()))
    if cfg.register_artifact:
        summary.registered = Registry(registry_root).register(cfg.name, model_dir, _metadata(cfg, summary, labels)).ref
    return summary

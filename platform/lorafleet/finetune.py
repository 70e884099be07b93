"""The fine-tuning flow, top to bottom: config -> data -> Ray Train -> test metrics -> registry.

`jobs/finetune.py` (for `ray job submit`) and `lorafleet train` both call `finetune()`. What a
sweep trial and a compare rung share with it (where a run lives, its data, scoring, registering)
lives in `lorafleet.run`; the names below are re-exported from there for existing callers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from lorafleet.base_model import load_tokenizer
from lorafleet.config import FinetuneConfig
from lorafleet.run import (
    ARTIFACT_DIR,
    CONFIG_FILE,
    RunPlace,
    RunSummary,
    dir_bytes,
    init_ray,
    load_splits,
    place_run,
    register_artifact,
    run_dir_config,
    run_metadata,
    score_checkpoint,
    task_labels,
)
from lorafleet.tasks import get_task
from lorafleet.train import MODEL_DIR, build_dataset, build_trainer
from lorafleet.uri import write_text

__all__ = ["RunSummary", "finetune", "init_ray", "load_splits", "run_dir_config", "CONFIG_FILE", "ARTIFACT_DIR"]


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
    task, labels = task_labels(cfg)

    # 1. Where the run lives: a unique new folder, or the interrupted run's (--resume).
    place = place_run(cfg, resume_dir)
    cfg = place.cfg

    # 2. Data: read, validate and tokenize everything before any worker starts.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data = load_splits(cfg, tokenizer, labels)
    init_ray()
    place.save_config()

    # 3. The feature-based baseline trains no torch weights: embeddings + logistic regression.
    if cfg.method.name == "feature":
        return _feature_baseline(cfg, data, labels, place, registry_root, started)

    # 4. Train on Ray, with a live progress display fed by rank 0.
    result, history = _fit(cfg, data, tokenizer, place, labels, progress)

    # 5. The best checkpoint by validation metric is the artifact; score it on the test split.
    metric = f"val_{task.primary_metric}"
    best = (result.get_best_checkpoint(metric, task.mode) if task.name != "text" else None) or result.checkpoint
    model_dir = _export_artifact(best, place)
    test_rows = [ex.row for ex in data["examples"]["test"]]
    test_metrics = _score_test(best, cfg, test_rows, labels) if task.name != "text" else {}

    final = result.metrics or {}
    summary = RunSummary(
        run_name=place.name, run_dir=str(place.location), method=cfg.method.name,
        task=task.name, test_metrics=test_metrics, trainable_params=int(final.get("trainable_params", 0)),
        total_params=int(final.get("total_params", 0)), wall_time_s=round(time.time() - started, 2),
        steps=int(final.get("step", 0)), artifact_dir=str(model_dir),
        peak_memory_mb=round(float(final.get("peak_memory_mb", 0.0)), 1),
        tokens_per_s=round(_mean([h["tokens_per_s"] for h in history if "tokens_per_s" in h]), 1),
        artifact_bytes=dir_bytes(model_dir), history=history,
        worker_nodes=next((h["worker_nodes"] for h in history if "worker_nodes" in h), []),
    )
    # 6. Register (atomically) only a run that finished; a failed run raised above.
    if cfg.register_artifact and task.name != "text":
        summary.registered = register_artifact(registry_root, cfg.name, model_dir, run_metadata(cfg, summary, labels))
    write_text(place.file("summary.json"), json.dumps(summary.as_dict(), indent=2))
    return summary


def _fit(cfg: FinetuneConfig, data: dict[str, Any], tokenizer, place: RunPlace, labels: list[str] | None,
         progress: bool) -> tuple[Any, list[dict[str, Any]]]:
    """Run the TorchTrainer; rank 0's step records feed `history` (and the live bar) meanwhile."""
    from ray.util.queue import Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    history: list[dict[str, Any]] = []
    task = get_task(cfg.task.name)
    stop = threading.Event()
    drainer = threading.Thread(
        target=_drain_progress,
        args=(queue, cfg.train.max_steps, stop, history, f"val_{task.primary_metric}", progress),
        daemon=True,
    )
    drainer.start()
    trainer = build_trainer(
        cfg,
        build_dataset(data["train_encoded"], tokenizer.pad_token_id),
        run_name=place.name,
        val_rows=[ex.row for ex in data["examples"]["validation"]],
        labels=labels,
        progress_queue=queue,
        log_path=place.file("train_log.jsonl"),
    )
    try:
        result = trainer.fit()
    finally:
        stop.set()
        drainer.join(timeout=5)
    if result.error:
        raise result.error
    return result, history


def _score_test(best: Any, cfg: FinetuneConfig, rows: list[dict[str, Any]], labels: list[str] | None) -> dict[str, float]:
    """The best checkpoint's test metrics; a GPU run is scored on a GPU (the driver may have none),
    from storage."""
    if cfg.scaling.use_gpu:
        score = ray.remote(num_gpus=1, num_cpus=cfg.scaling.cpus_per_worker)(score_checkpoint)
        return ray.get(score.remote(best, cfg, rows, labels))
    return score_checkpoint(best, cfg, rows, labels)


def _export_artifact(best: Any, place: RunPlace) -> Path:
    """Copy the best checkpoint's model out as the artifact.

    It stays with its run (a local run folder), so nothing is left behind in /tmp; with object
    storage it is copied to a temporary folder that the caller owns.
    """
    root = place.dir if place.dir is not None else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))
    model_dir = root / ARTIFACT_DIR
    with best.as_directory() as d:
        shutil.rmtree(model_dir, ignore_errors=True)  # a resumed run replaces its old artifact
        shutil.copytree(Path(d) / MODEL_DIR, model_dir)
    return model_dir


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


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _fit_features(cfg_json: dict, train_rows: list[dict], test_rows: list[dict], labels: list[str]):
    """The feature baseline's Ray task: frozen-model features + logistic regression, then scored."""
    import resource

    import numpy as np
    from safetensors.numpy import save
    from sklearn.linear_model import LogisticRegression

    from lorafleet.base_model import load_model
    from lorafleet.data import prompt_ids
    from lorafleet.evaluate import last_token_features, run_device

    c = FinetuneConfig.model_validate(cfg_json)
    task = get_task(c.task)  # configured: the run's labels and instruction line in the prompt
    tok = load_tokenizer(c.model.name_or_path)
    model = load_model(c.model.name_or_path, c.model.dtype).to(run_device(c.scaling.use_gpu))  # the GPU it reserves

    featurized = {"tokens": 0, "seconds": 0.0}

    def feats(rows):
        ids = [prompt_ids(tok, task.instruction(r)) for r in rows]
        t0 = time.perf_counter()
        out = last_token_features(model, tok, ids).numpy()
        featurized["seconds"] += time.perf_counter() - t0
        featurized["tokens"] += sum(len(x) for x in ids)
        return out

    y = [labels.index(task.target(r).strip()) for r in train_rows]
    clf = LogisticRegression(max_iter=2000).fit(feats(train_rows), y)
    preds = [labels[i] for i in clf.predict(feats(test_rows))]
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


def _feature_baseline(cfg: FinetuneConfig, data: dict[str, Any], labels: list[str] | None, place: RunPlace,
                      registry_root: str | Path, started: float) -> RunSummary:
    """Frozen-model features + logistic regression, run as one Ray task on the cluster."""
    # max_calls=1: a fresh worker process, so its peak RSS is this run's alone.
    fit = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                     max_calls=1)(_fit_features)
    train_rows = [ex.row for ex in data["examples"]["train"]]
    test_rows = [ex.row for ex in data["examples"]["test"]]
    metrics, trainable, total, files, measured = ray.get(
        fit.remote(cfg.model_dump(mode="json"), train_rows, test_rows, labels)
    )
    run_dir = str(place.location)
    root = place.dir if place.dir is not None else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))
    model_dir = root / ARTIFACT_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    for fname, blob in files.items():
        (model_dir / fname).write_bytes(blob)
    summary = RunSummary(place.name, run_dir, "feature", cfg.task.name, metrics, trainable, total,
                         round(time.time() - started, 2), 0, str(model_dir),
                         peak_memory_mb=round(measured["peak_memory_mb"], 1),
                         tokens_per_s=round(measured["tokens_per_s"], 1), artifact_bytes=dir_bytes(model_dir))
    if cfg.register_artifact:
        summary.registered = register_artifact(registry_root, cfg.name, model_dir, run_metadata(cfg, summary, labels))
    return summary

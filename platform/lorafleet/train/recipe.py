"""The fine-tuning recipe, top to bottom: config -> data -> Ray Train -> test metrics -> registry.

`jobs/finetune.py` (for `ray job submit`) and `lorafleet train` both call `finetune()`. A sweep
trial and a compare rung share its pieces: `RunContext` (config, task, labels, splits, run place)
and `lorafleet.train.results` (scoring, metadata, registering).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from lorafleet.base_model import load_tokenizer
from lorafleet.cluster import init_ray, on_run_accelerator
from lorafleet.config import FinetuneConfig
from lorafleet.tracking import Tracker, start_run
from lorafleet.train.clusters import Cluster, running_cluster
from lorafleet.train.context import ARTIFACT_DIR, CONFIG_FILE, RunContext, RunPlace
from lorafleet.train.dataset import build_dataset
from lorafleet.train.feature import feature_baseline
from lorafleet.train.plan import refuse_misfits
from lorafleet.train.results import (
    RunSummary,
    checkpoint_artifact,
    dir_bytes,
    register_artifact,
    run_metadata,
    score_checkpoint,
    score_model_dir,
)
from lorafleet.train.worker import build_trainer
from lorafleet.uri import join, write_text

__all__ = ["finetune"]


def finetune(
    cfg: FinetuneConfig,
    *,
    registry_root: str | Path,
    resume_dir: str | Path | None = None,
    progress: bool = True,
    cluster: Cluster | None = None,
    tracking_parent: Tracker | None = None,
) -> RunSummary:
    """Train `cfg` on Ray, score the best checkpoint on the test split, register it.

    Args:
        cfg: a resolved config (see `lorafleet.config.load_config`).
        registry_root: where the artifact is registered.
        resume_dir: a run folder of an interrupted run (driver died): continue it.
        progress: show a live progress bar on the driver.
        cluster: the cluster to check the run against before anything starts (`--cluster`, `--gpus`);
            default: the Ray cluster it joins, once Ray is up, where what that can hold is known.
        tracking_parent: with `cfg.tracking` on, log the run as this run's child (a ladder's rung).

    Raises:
        PlanError: the run cannot be placed or cannot fit (lorafleet.train.plan); nothing was started.
        TrackingError: `cfg.tracking` names an MLflow server that cannot be reached; nothing was trained.
    """
    trackers: list[Tracker] = []  # the run's tracker, once its name is known (lorafleet.tracking)
    try:
        summary = _finetune(cfg, registry_root, resume_dir, progress, cluster, tracking_parent, trackers)
    except BaseException:
        for tracker in trackers:
            tracker.finish(ok=False)
        raise
    _track_summary(trackers[0], summary)
    return summary


def _finetune(cfg: FinetuneConfig, registry_root: str | Path, resume_dir: str | Path | None, progress: bool,
              cluster: Cluster | None, tracking_parent: Tracker | None, trackers: list[Tracker]) -> RunSummary:
    started = time.time()
    refuse_misfits({cfg.name: cfg}, cluster, f"run {cfg.name}")

    # 1. The run's inputs, once: labels, every split read and validated (file:line errors), and where
    #    the run lives (a unique new folder, or the interrupted run's with --resume).
    ctx = RunContext.build(cfg, resume_dir)
    cfg, task, labels, place = ctx.cfg, ctx.task, ctx.labels, ctx.place

    # 2. Tokenize everything before any worker starts (a row over data.max_seq_len fails here, unless
    #    data.truncate cuts it).
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    train_encoded = ctx.encode(tokenizer)
    init_ray()
    if cluster is None:  # the cluster Ray joined: refuse what it can never place or hold, not wait for it
        refuse_misfits({cfg.name: cfg}, running_cluster(), f"run {cfg.name}")
    place.save_config()
    trackers.append(start_run(cfg.tracking, place.name, parent=tracking_parent, config=cfg.model_dump(mode="json"),
                              tags={"lorafleet.kind": "run", "lorafleet.task": task.name,
                                    "lorafleet.method": cfg.method.name, "lorafleet.run_dir": str(place.location)}))

    # 3. The feature-based baseline trains no torch weights: embeddings + logistic regression.
    if cfg.method.name == "feature":
        return feature_baseline(ctx, registry_root, started)

    # 4. Train on Ray, with a live progress display fed by rank 0.
    result, history = _fit(ctx, build_dataset(train_encoded, tokenizer.pad_token_id, cfg), progress,
                           trackers[0])

    # 5. The best checkpoint by validation metric is the artifact; score it on the test split.
    metric = f"val_{task.primary_metric}"
    best = (result.get_best_checkpoint(metric, task.mode) if task.name != "text" else None) or result.checkpoint
    model_dir = _export_artifact(best, place, cfg)
    test_metrics = _score_test(best, model_dir, cfg, ctx.rows("test"), labels) if task.name != "text" else {}

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


def _fit(ctx: RunContext, dataset: ray.data.Dataset, progress: bool,
         tracker: Tracker) -> tuple[Any, list[dict[str, Any]]]:
    """Run the TorchTrainer; rank 0's step records feed `history`, the live bar and the tracker meanwhile."""
    from ray.util.queue import Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    history: list[dict[str, Any]] = []
    stop = threading.Event()
    drainer = threading.Thread(
        target=_drain_progress,
        args=(queue, ctx.cfg.train.max_steps, stop, history, f"val_{ctx.task.primary_metric}", progress, tracker),
        daemon=True,
    )
    drainer.start()
    trainer = build_trainer(
        ctx.cfg,
        dataset,
        run_name=ctx.place.name,
        val_rows=ctx.rows("validation"),
        labels=ctx.labels,
        progress_queue=queue,
        log_path=ctx.place.file("train_log.jsonl"),
    )
    try:
        result = trainer.fit()
    finally:
        stop.set()
        drainer.join(timeout=5)
    if result.error:
        raise result.error
    return result, history


def _score_test(best: Any, model_dir: Path, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                labels: list[str] | None) -> dict[str, float]:
    """The best checkpoint's test metrics; a GPU run is scored on a GPU (the driver may have none),
    from storage; a CPU run scores the artifact just exported."""
    if cfg.scaling.use_gpu:
        return on_run_accelerator(score_checkpoint, use_gpu=True, cpus=cfg.scaling.cpus_per_worker)(best, cfg, rows, labels)
    return score_model_dir(model_dir, cfg, rows, labels)


def _export_artifact(best: Any, place: RunPlace, cfg: FinetuneConfig) -> Path:
    """The best checkpoint's model, as the artifact (exported from the shards of a sharded run).

    It stays with its run (a local run folder), so nothing is left behind in /tmp; with object
    storage it goes to a temporary folder that the caller owns.
    """
    root = place.dir if place.dir is not None else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))
    with best.as_directory() as d:  # a resumed run replaces its old artifact
        return checkpoint_artifact(Path(d), cfg, root / ARTIFACT_DIR)


def _drain_progress(queue, total_steps: int, stop: threading.Event, history: list[dict[str, Any]], metric: str, show: bool,
                    tracker: Tracker):
    """Collect rank 0's step records into `history` and the tracker (live curves); with `show`, draw a
    live progress bar."""
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
            tracker.log_steps([rec])
            if metric in rec:
                last_metric = f" {metric}={rec[metric]:.3f}"
            bar.update(t, completed=rec["step"], info=f"loss={rec['loss']:.3f}{last_metric}")


def _track_summary(tracker: Tracker, summary: RunSummary) -> None:
    """A finished run's results on its tracked run: test metrics, sizes, wall time, the registry
    reference (tag `lorafleet.registered`), the summary and resolved config files; then end it."""
    results = {f"test_{k}": v for k, v in summary.test_metrics.items()}
    results |= {"trainable_params": summary.trainable_params, "total_params": summary.total_params,
                "wall_time_s": summary.wall_time_s, "mean_tokens_per_s": summary.tokens_per_s,
                "peak_memory_mb": summary.peak_memory_mb, "artifact_bytes": summary.artifact_bytes}
    tracker.log_metrics(results, step=summary.steps)
    tracker.set_tags({"lorafleet.registered": summary.registered, "lorafleet.artifact_dir": summary.artifact_dir})
    tracker.log_files([join(summary.run_dir, "summary.json"), join(summary.run_dir, CONFIG_FILE)])
    tracker.finish()
    summary.tracking_run_id = tracker.run_id


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0

"""Ray Train: the per-worker training loop and the TorchTrainer that runs it.

One loop serves full, partial, lora and head: the method only decides what is trainable and what a
checkpoint holds. Each worker gets its shard from Ray Data; rank 0 evaluates and checkpoints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig
from ray.train.torch import TorchTrainer

from lorafleet.base_model import load_tokenizer
from lorafleet.config import FinetuneConfig
from lorafleet.tasks import get_task
from lorafleet.train.checkpoint import MODEL_DIR, Validation, evaluate_and_checkpoint, load_trainable, restore_state
from lorafleet.train.dataset import TrimPaddingCollate, build_scheduler
from lorafleet.train.methods import count_params
from lorafleet.train.precision import training_precision
from lorafleet.train.fsdp import shard_model
from lorafleet.train.steps import build_model, optimizer_steps, wrap_model
from lorafleet.uri import append_line

__all__ = ["build_trainer", "train_loop_per_worker"]


def _quiet_report_logs() -> None:
    # Ray 2.60 logs every ray.train.report() at INFO ("Reporting training result ...") under a
    # logger named by its file path, which Ray Train's own log-level filter (it matches
    # "ray.train*") misses; each evaluation (the only reports, see the loop) would print a block
    # into the progress bar and the driver's output.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the model, restore, train, report, checkpoint."""
    # Over 60 lines on purpose: the worker's story reads top to bottom (STYLE.md); the per-step
    # pieces are lorafleet.train.steps, the checkpoint ones lorafleet.train.checkpoint.
    _quiet_report_logs()
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    task = get_task(cfg.task)  # configured: the run's labels, languages and instruction
    labels: list[str] | None = loop_config.get("labels")
    val_rows: list[dict] = loop_config.get("val_rows") or []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial adapter/head on every rank

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    device = ray.train.torch.get_device()
    sharded = cfg.scaling.strategy == "fsdp"
    # FSDP2: built on the meta device and sharded, no rank holds the whole model (train.fsdp); DDP: every
    # rank holds all of it.
    model = shard_model(cfg, device) if sharded else build_model(cfg, len(labels) if labels else None, device=device)
    trainable, total = count_params(model)

    # Resume: after a worker failure (or --resume) Ray hands every worker the latest registered checkpoint.
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as opened:
        ckpt = Path(opened.enter_context(checkpoint.as_directory())) if checkpoint else None
        if ckpt is not None and not sharded:
            load_trainable(model, cfg, ckpt / MODEL_DIR)  # before wrapping, while every rank holds the whole model
        if not sharded:
            model = wrap_model(model, cfg)
        precision = training_precision(cfg.model.dtype, device, sharded=sharded)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = build_scheduler(optimizer, cfg)
        position = restore_state(ckpt, model, optimizer, scheduler, precision) if ckpt else None
    resumed_from = position["step"] if position else None
    # Where the data stands: a resumed run continues its epoch after the batches it already trained on.
    step, epoch, epoch_steps = (position["step"], position["epoch"], position["epoch_steps"]) if position else (0, 0, 0)
    validation = Validation(cfg, task, tokenizer, val_rows[: cfg.train.eval_samples], labels, precision)
    # Where each rank runs (shown once in the log; the 2-node test checks one worker per node).
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    progress = loop_config.get("progress_queue")
    log_path = loop_config.get("log_path")
    shard = ray.train.get_dataset_shard("train")
    window_tokens, window_start, window_step = 0, time.perf_counter(), step

    while step < cfg.train.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            collate_fn=TrimPaddingCollate(),
            drop_last=True,
            local_shuffle_buffer_size=cfg.train.batch_size * 8,
            local_shuffle_seed=cfg.train.seed + epoch * 1000 + rank,
        )
        if epoch_steps:  # resumed mid-epoch: skip what was trained on (the order is the same every run)
            batches = itertools.islice(batches, epoch_steps * cfg.train.grad_accum, None)
        model.train()
        for loss, tokens in optimizer_steps(model, batches, cfg, device=device, optimizer=optimizer,
                                            scheduler=scheduler, params=params, precision=precision):
            window_tokens += tokens * world
            step += 1
            epoch_steps += 1

            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
            if step % cfg.train.log_every and not is_eval:
                continue
            elapsed = time.perf_counter() - window_start
            n_steps = step - window_step
            metrics: dict[str, Any] = {
                "step": step,
                "loss": float(loss),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                "step_time_s": elapsed / max(1, n_steps),
                "epoch": epoch,
                "trainable_params": trainable,
                "total_params": total,
                "resumed_from": resumed_from,
            }
            if nodes:
                metrics["worker_nodes"], nodes = nodes, []
            ckpt = None
            if is_eval:
                position = {"step": step, "epoch": epoch, "epoch_steps": epoch_steps}
                scores, ckpt_dir = evaluate_and_checkpoint(model, optimizer, scheduler, position, rank, validation)
                metrics.update(scores)
                ckpt = Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            metrics["peak_memory_mb"] = _peak_memory_mb(device)  # after evaluation, which can be the peak
            if rank == 0:
                _log(progress, log_path, metrics)
            # Only evaluations go to Ray: in Ray 2.60 report() waits until the controller drains the
            # worker's one-slot result queue, which it does every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S);
            # reporting every log window pinned steps at 2 s / log_every (bench/RESULTS.md). The
            # per-step numbers reach the driver through the progress queue and train_log.jsonl.
            if is_eval:
                # The local copy goes once it is in storage_path: full-model checkpoints add up fast.
                ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None)
            window_tokens, window_start, window_step = 0, time.perf_counter(), step
            if step >= cfg.train.max_steps:
                break
        epoch, epoch_steps = epoch + 1, 0


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: max allocated on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _log(progress, log_path: str | None, metrics: dict[str, Any]) -> None:
    record = dict(metrics)
    record["time"] = time.time()
    if progress is not None:
        try:
            progress.put_nowait(record)
        except Exception:  # a full or gone queue only costs the live display, never the run
            pass
    if log_path:  # a run folder's file, or an object in the run's s3:// storage
        append_line(log_path, json.dumps(record))


def build_trainer(
    cfg: FinetuneConfig,
    dataset: ray.data.Dataset,
    *,
    run_name: str,
    val_rows: list[dict],
    labels: list[str] | None,
    progress_queue=None,
    log_path: str | None = None,
    callbacks: list | None = None,
) -> TorchTrainer:
    """The TorchTrainer for one run; reusing (name, storage_path) resumes that run.

    `callbacks` go to Ray Train's RunConfig (a sweep passes Tune's report callback).
    """
    metric_key = f"val_{get_task(cfg.task.name).primary_metric}"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "val_rows": val_rows,
            "labels": labels,
            "progress_queue": progress_queue,
            "log_path": log_path,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            accelerator_type=cfg.scaling.accelerator_type,
        ),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=metric_key,
                checkpoint_score_order="max" if get_task(cfg.task.name).mode == "max" else "min",
            ),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
    )

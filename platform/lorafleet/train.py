"""Ray Train: the per-worker training loop and the TorchTrainer that runs it.

One loop serves full, partial, lora and head: the method only decides what is trainable and what a
checkpoint holds. Each worker gets its shard from Ray Data; rank 0 evaluates and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import ray
import ray.train
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint, CheckpointConfig, FailureConfig
from ray.train.torch import TorchTrainer

from lorafleet.base_model import load_tokenizer
from lorafleet.checkpoint import MODEL_DIR, STATE_FILE, evaluate_and_checkpoint, load_trainable, save_artifact
from lorafleet.config import FinetuneConfig
from lorafleet.data import IGNORE_INDEX
from lorafleet.methods import count_params
from lorafleet.precision import training_precision
from lorafleet.steps import build_model, is_fsdp, optimizer_steps, wrap_model
from lorafleet.tasks import get_task
from lorafleet.uri import append_line

# MODEL_DIR, STATE_FILE and save_artifact live in lorafleet.checkpoint; imported here for callers.
__all__ = ["build_dataset", "build_trainer", "train_loop_per_worker", "MODEL_DIR", "STATE_FILE", "save_artifact"]



def build_dataset(encoded: list[dict[str, list[int]]], pad_id: int) -> ray.data.Dataset:
    """Pad to one width (so rows are fixed-size arrays) and hand them to Ray Data for sharding."""
    width = max(len(r["input_ids"]) for r in encoded)
    label_width = max(len(r["labels"]) for r in encoded)
    rows = []
    for r in encoded:
        n = len(r["input_ids"])
        rows.append(
            {
                "input_ids": np.array(r["input_ids"] + [pad_id] * (width - n), dtype=np.int64),
                "attention_mask": np.array([1] * n + [0] * (width - n), dtype=np.int64),
                "labels": np.array(r["labels"] + [IGNORE_INDEX] * (label_width - len(r["labels"])), dtype=np.int64),
            }
        )
    return ray.data.from_items(rows)


def _collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # Trim the padding this batch does not need: most steps then run on short sequences.
    width = int(batch["attention_mask"].sum(axis=1).max())
    out = {k: torch.as_tensor(v) for k, v in batch.items()}
    out["input_ids"] = out["input_ids"][:, :width]
    out["attention_mask"] = out["attention_mask"][:, :width]
    if out["labels"].shape[1] > 1:  # causal LM labels align with input_ids; head labels are one index
        out["labels"] = out["labels"][:, :width]
    return out


class TrimPaddingCollate(NumpyBatchCollateFn):
    """Ray Data's collate hook (a class: plain functions are deprecated since Ray 2.47)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return _collate(batch)


def _lr_lambda(cfg: FinetuneConfig):
    warmup, total = cfg.train.warmup_steps, cfg.train.max_steps

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


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
    # pieces are lorafleet.steps, the checkpoint ones lorafleet.checkpoint.
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
    model = build_model(cfg, len(labels) if labels else None)
    trainable, total = count_params(model)

    # Resume: after a worker failure Ray hands every worker the latest registered checkpoint.
    # Weights load before wrapping, while every rank still holds the whole model.
    step, resumed_from, state = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_trainable(model, cfg, Path(d) / MODEL_DIR)
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)

    device = ray.train.torch.get_device()
    model = wrap_model(model, cfg, device)
    precision = training_precision(cfg.model.dtype, device, sharded=is_fsdp(model))
    # Where each rank runs (shown once in the log; the 2-node test checks one worker per node).
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    if state is not None:
        optim_state = state["optimizer"]
        if is_fsdp(model):  # saved unsharded (see checkpoint.evaluate_and_checkpoint): shard it for this rank
            from torch.distributed.fsdp import FullyShardedDataParallel

            optim_state = FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, optim_state)
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(state["scheduler"])
        if precision.scaler and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        step = resumed_from = state["step"]

    progress = loop_config.get("progress_queue")
    log_path = loop_config.get("log_path")
    shard = ray.train.get_dataset_shard("train")
    epoch = 0
    window_tokens, window_start, window_step = 0, time.perf_counter(), step

    while step < cfg.train.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            collate_fn=TrimPaddingCollate(),
            drop_last=True,
            local_shuffle_buffer_size=cfg.train.batch_size * 8,
            local_shuffle_seed=cfg.train.seed + epoch * 1000 + rank,
        )
        model.train()
        for loss, tokens in optimizer_steps(model, batches, cfg, device=device, optimizer=optimizer,
                                            scheduler=scheduler, params=params, precision=precision):
            window_tokens += tokens * world
            step += 1

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
                metrics.update(evaluate_and_checkpoint(model, tokenizer, cfg, task, val_rows, labels, optimizer,
                                                        scheduler, step, rank, precision))
                ckpt_dir = metrics.pop("_ckpt_dir", None)
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
        epoch += 1


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: max allocated on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _log(progress, log_path: str | None, metrics: dict[str, Any]) -> None:
    record = {k: v for k, v in metrics.items() if not k.startswith("_")}
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

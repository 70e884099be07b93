"""A training checkpoint, and the validation score that ranks it.

DDP: rank 0 writes the artifact files (`model/`, exactly what gets registered) and the trainer state
(optimizer, scheduler, step, loss scaler). FSDP2: every rank writes its shards (`shards/`, see
`lorafleet.train.fsdp`) and rank 0 the rest of the trainer state; the artifact is exported once, at the end.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lorafleet.config import FinetuneConfig, dump_config
from lorafleet.evaluate import evaluate_rows
from lorafleet.tasks import Task
from lorafleet.head import HeadClassifier
from lorafleet.train.precision import Precision
from lorafleet.train.fsdp import SHARDS_DIR, is_sharded, load_shards, save_shards
from lorafleet.train.steps import build_model, unwrap

__all__ = ["MODEL_DIR", "STATE_FILE", "Validation", "evaluate_and_checkpoint", "export_shards", "load_trainable",
           "restore_state", "save_artifact"]

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"  # inside a checkpoint: the artifact files, exactly what gets registered


def save_artifact(model: torch.nn.Module, tokenizer, cfg: FinetuneConfig, out: Path, labels: list[str] | None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write what gets registered: a peft adapter, a full HF model (+ tokenizer), or a head.

    ``state_dict``: the weights to save instead of the model's own (full and partial).
    """
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if isinstance(model, HeadClassifier):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
        (out / "head.json").write_text(json.dumps({"labels": labels, "base_model": cfg.model.name_or_path}))
    elif cfg.method.name == "lora":
        model.save_pretrained(out, safe_serialization=True)  # adapter weights + adapter_config.json only
    else:  # full or partial
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)


def load_trainable(model: torch.nn.Module, cfg: FinetuneConfig, ckpt_model: Path) -> None:
    model = unwrap(model)
    from safetensors.torch import load_file

    if isinstance(model, HeadClassifier):
        model.head.load_state_dict(load_file(ckpt_model / "head.safetensors"))
    elif cfg.method.name == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt_model / "adapter_model.safetensors"))
    else:
        state = {}
        for f in sorted(ckpt_model.glob("*.safetensors")):
            state.update(load_file(f))
        model.load_state_dict(state, strict=False)


@dataclass
class Validation:
    """What scoring at a checkpoint needs, fixed for a worker's whole run."""

    cfg: FinetuneConfig
    task: Task  # configured: the run's labels, languages and instruction
    tokenizer: Any
    rows: list[dict[str, Any]]  # the validation rows scored (the first `train.eval_samples`)
    labels: list[str] | None
    precision: Precision


def evaluate_and_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                            position: dict[str, int], rank: int, val: Validation) -> tuple[dict[str, float], Path | None]:
    """(validation metrics `val_<name>`, this rank's checkpoint folder or None). Every rank calls it.

    `position`: where training stands ({"step", "epoch", "epoch_steps"}: optimizer steps so far, the
    epoch, and the steps taken in it), saved so a resumed run continues with the next batch.

    DDP: rank 0 scores the validation rows and writes the checkpoint; the score is broadcast so every
    rank reports the same metrics (Ray attaches rank 0's to the checkpoint). FSDP2: every rank scores
    the same rows on the sharded model (each forward gathers one block at a time, so no rank holds the
    whole model; the ranks compute the same numbers) and writes its shards."""
    if is_sharded(model):
        metrics = _score(model, val)
        ckpt_dir = Path(tempfile.mkdtemp(prefix="lorafleet-ckpt-"))
        save_shards(model, optimizer, ckpt_dir / SHARDS_DIR)
        if rank == 0:
            _write_state(ckpt_dir, val.cfg, scheduler, position, val.precision, optimizer=None)
        return metrics, ckpt_dir
    metrics: dict[str, float] = {}
    ckpt_dir = None
    if rank == 0:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="lorafleet-ckpt-"))
        save_artifact(model, val.tokenizer, val.cfg, ckpt_dir / MODEL_DIR, val.labels)
        metrics = _score(unwrap(model), val)
        _write_state(ckpt_dir, val.cfg, scheduler, position, val.precision, optimizer=optimizer)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [metrics]
        dist.broadcast_object_list(holder, src=0)
        metrics = holder[0]
    return metrics, ckpt_dir


def _score(model: torch.nn.Module, val: Validation) -> dict[str, float]:
    # A sharded model's root (the peft wrapper) holds the embeddings, the final norm and the head itself;
    # its hooks gather them only when the root is called. Generation calls the inner model (peft's and
    # transformers' generate), past those hooks, and met the still-sharded embedding ("got mixed
    # torch.Tensor and DTensor"): gather the root's own parameters for the evaluation. Each decoder
    # block still gathers and frees itself.
    sharded = is_sharded(model)
    if sharded:
        model.unshard()
    try:
        with val.precision.autocast():  # as in training: partial's fp32 blocks take bf16 activations
            scores = evaluate_rows(model, val.tokenizer, val.task, val.rows, val.labels) if val.rows else {}
    finally:
        if sharded:
            model.reshard()
    model.train()
    return {f"val_{k}": v for k, v in scores.items()}


def _write_state(ckpt_dir: Path, cfg: FinetuneConfig, scheduler: Any, position: dict[str, int],
                 precision: Precision, optimizer: torch.optim.Optimizer | None) -> None:
    """The trainer state besides the weights (the optimizer's too, unless it is sharded) and the config."""
    torch.save(
        {"optimizer": optimizer.state_dict() if optimizer is not None else None,
         "scheduler": scheduler.state_dict(), **position,
         "rng": torch.get_rng_state(),  # dropout's stream; every rank's is rank 0's (same seed, same draws)
         "scaler": precision.scaler.state_dict() if precision.scaler else None},
        ckpt_dir / STATE_FILE,
    )
    (ckpt_dir / "config.yaml").write_text(dump_config(cfg))


def restore_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  precision: Precision) -> dict[str, int]:
    """Load a checkpoint's optimizer, scheduler and scaler state (a sharded run's weights too: each rank
    its own part); returns where training stood ({"step", "epoch", "epoch_steps"}; a checkpoint written
    before the data position was saved restarts its epoch). The weights of a DDP run load before
    wrapping (`load_trainable`)."""
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    if (ckpt / SHARDS_DIR).is_dir():
        load_shards(model, optimizer, ckpt / SHARDS_DIR)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    if precision.scaler and state.get("scaler"):
        precision.scaler.load_state_dict(state["scaler"])
    return {"step": int(state["step"]), "epoch": int(state.get("epoch", 0)), "epoch_steps": int(state.get("epoch_steps", 0))}


def export_shards(shards: Path, cfg: FinetuneConfig, tokenizer, out: Path) -> Path:
    """The artifact of a sharded run's checkpoint, in one process (no process group): the base model in
    `model.dtype` with the method applied, its trainable weights read from every rank's shard, saved as
    training saves it (a peft adapter for lora; a full HF model in `model.dtype` for full and partial)."""
    import torch.distributed.checkpoint as dcp

    model = build_model(cfg, None)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if k in trainable}
    dcp.load({"model": state}, checkpoint_id=str(shards))
    model.load_state_dict(state, strict=False)
    if cfg.method.name != "lora":  # the fp32 master weights, consolidated in the run's dtype
        model.to(getattr(torch, cfg.model.dtype))
    save_artifact(model, tokenizer, cfg, out, None)
    return out

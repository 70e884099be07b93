"""A training checkpoint: the artifact files (exactly what gets registered) plus the trainer state.

Rank 0 scores the validation rows and writes the checkpoint; FSDP first gathers the full weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lorafleet.base_model import load_model
from lorafleet.config import FinetuneConfig, dump_config
from lorafleet.evaluate import evaluate_rows
from lorafleet.methods import HeadClassifier
from lorafleet.precision import Precision
from lorafleet.steps import is_fsdp, unwrap

__all__ = ["MODEL_DIR", "STATE_FILE", "save_artifact", "load_trainable", "evaluate_and_checkpoint"]

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"  # inside a checkpoint: the artifact files, exactly what gets registered


def save_artifact(model: torch.nn.Module, tokenizer, cfg: FinetuneConfig, out: Path, labels: list[str] | None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write what gets registered: a peft adapter, a full HF model (+ tokenizer), or a head.

    ``state_dict``: the full weights when the model is sharded (FSDP gathers them on rank 0).
    """
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if isinstance(model, HeadClassifier):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
        (out / "head.json").write_text(json.dumps({"labels": labels, "base_model": cfg.model.name_or_path}))
    elif cfg.method.name == "lora":
        model.save_pretrained(out, safe_serialization=True)  # adapter weights + adapter_config.json only
    else:  # full or partial; FSDP (full only) passes the gathered weights
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


def evaluate_and_checkpoint(model, tokenizer, cfg, task, val_rows, labels, optimizer, scheduler, step, rank,
                             precision: Precision) -> dict[str, Any]:
    # Rank 0 scores the validation rows and writes the checkpoint; the score is broadcast so every
    # rank reports the same metrics (Ray attaches rank 0's to the checkpoint).
    out: dict[str, Any] = {}
    model_state, optim_state = None, None
    if is_fsdp(model):
        # Sharded: every rank takes part in gathering the full weights and optimizer state onto
        # rank 0, which then saves them and scores a plain copy (a sharded forward would need
        # every rank in each step of generation).
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = next(model.parameters()).device.type == "cuda"  # on CPU, torch 2.13 segfaults with it
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
            model_state = model.state_dict()
            optim_state = FSDP.optim_state_dict(model, optimizer)
    if rank == 0:
        d = Path(tempfile.mkdtemp(prefix="lorafleet-ckpt-"))
        save_artifact(model, tokenizer, cfg, d / MODEL_DIR, labels, state_dict=model_state)
        scored = unwrap(model)
        if model_state is not None:
            scored = load_model(str(d / MODEL_DIR), cfg.model.dtype).to(next(model.parameters()).device)
        rows = val_rows[: cfg.train.eval_samples]
        with precision.autocast():  # as in training: partial's fp32 blocks take bf16 activations
            scores = evaluate_rows(scored, tokenizer, task, rows, labels) if rows else {}
        out.update({f"val_{k}": v for k, v in scores.items()})
        torch.save(
            {"optimizer": optim_state if optim_state is not None else optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step,
             "scaler": precision.scaler.state_dict() if precision.scaler else None},
            d / STATE_FILE,
        )
        (d / "config.yaml").write_text(dump_config(cfg))
        out["_ckpt_dir"] = str(d)
        del scored
        unwrap(model).train()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [{k: v for k, v in out.items() if k != "_ckpt_dir"}]
        dist.broadcast_object_list(holder, src=0)
        if rank != 0:
            out = holder[0]
    return out

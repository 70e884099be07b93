"""What one Ray Train worker trains and how it steps: build the model, wrap it, run optimizer steps.

No Ray state is needed here (DDP wrapping asks Ray Train for it), so tests call these directly.
Precision policy: lorafleet.train.precision.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from lorafleet.base_model import load_model, model_skeleton
from lorafleet.config import FinetuneConfig
from lorafleet.head import HeadClassifier
from lorafleet.train.methods import apply_method
from lorafleet.train.packing import model_inputs
from lorafleet.train.precision import Precision, keep_trainable_fp32

__all__ = ["build_model", "optimizer_steps", "unwrap", "wrap_model"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise: FSDP2 shards in place)."""
    return model.module if hasattr(model, "module") else model


def wrap_model(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """DDP through Ray Train (``scaling.strategy: ddp``); a sharded model is built sharded instead
    (``lorafleet.train.fsdp.shard_model``)."""
    import ray.train.torch  # here: the rest of this module runs without Ray

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def build_model(cfg: FinetuneConfig, num_labels: int | None, *, skeleton: bool = False,
                device: torch.device | None = None) -> torch.nn.Module:
    """The model to train: the base in ``model.dtype``, the method applied, trainable weights in fp32.

    ``skeleton``: parameters on the meta device, no weights read (what sharded training shards).
    ``device``: where a 4-bit base (QLoRA, ``method.lora.quantize``) is loaded; any other base loads on the
    CPU and is moved by the caller."""
    m = cfg.model
    if skeleton:  # the planner's shapes: a 4-bit base has the same parameters, counted at its own bytes there
        base = model_skeleton(m.name_or_path, m.dtype, m.trust_remote_code, m.attn_implementation)
    else:
        quantize = cfg.method.lora.quantize if cfg.method.name == "lora" else "none"
        base = load_model(m.name_or_path, m.dtype, m.trust_remote_code, m.attn_implementation,
                          quantize=quantize, device=device)
        if quantize != "none":
            from peft import prepare_model_for_kbit_training  # QLoRA's recipe: norms/embeddings fp32, input grads

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.train.grad_checkpointing)
    model = apply_method(base, cfg.method, num_labels=num_labels)
    if cfg.train.grad_checkpointing and hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable()
    keep_trainable_fp32(model)  # master weights (lorafleet.train.precision)
    return model


def optimizer_steps(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: FinetuneConfig, *,
                    device: torch.device, optimizer: torch.optim.Optimizer, scheduler, params: list[torch.Tensor],
                    precision: Precision) -> Iterator[tuple[torch.Tensor, int]]:
    """One epoch of optimizer steps over ``batches``; yields (last micro-batch loss, tokens) after each.

    Micro-steps that only accumulate skip DDP's gradient all-reduce (``no_sync``). A sharded (FSDP2) model
    reduce-scatters every micro-step instead and accumulates its gradient shards: skipping the sync there
    (``set_requires_gradient_sync(False)``) would keep the whole model's unsharded gradients on every rank
    until the last micro-step. A partial accumulation left at the end of the epoch is dropped, not added
    into the next epoch's first step.
    """
    is_head = isinstance(unwrap(model), HeadClassifier)
    # packed batches keep each row's attention apart in the way the model's attention needs (train.packing)
    attn = None if is_head else getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    accum, scaler = cfg.train.grad_accum, precision.scaler
    micro, tokens = 0, 0
    for batch in batches:
        micro += 1
        sync = micro % accum == 0
        no_sync = getattr(model, "no_sync", None)
        with (contextlib.nullcontext() if sync or no_sync is None else no_sync()):
            with precision.autocast():
                if is_head:
                    logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 0].to(device))
                else:
                    loss = model(**model_inputs(batch, device, attn)).loss
            scaled = loss / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        tokens += int(batch["attention_mask"].sum())  # real tokens (a packed block's padded tail is 0)
        if not sync:
            continue
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients
        # FSDP2's gradients are DTensor shards: the norm is reduced over every rank's shard.
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        if scaler:
            scaler.step(optimizer)  # skipped when the fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        yield loss.detach(), tokens
        tokens = 0
    optimizer.zero_grad(set_to_none=True)

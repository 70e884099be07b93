"""What one Ray Train worker trains and how it steps: build the model, wrap it, run optimizer steps.

No Ray state is needed here (DDP wrapping asks Ray Train for it), so tests call these directly.
Precision policy: lorafleet.precision.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from lorafleet.base_model import load_model
from lorafleet.config import FinetuneConfig
from lorafleet.methods import HeadClassifier, apply_method
from lorafleet.precision import Precision, fsdp_mixed_precision, keep_trainable_fp32

__all__ = ["build_model", "wrap_model", "optimizer_steps", "unwrap", "is_fsdp"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP wrapper (the model itself when unwrapped)."""
    return model.module if hasattr(model, "module") else model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether the model is sharded by FSDP (its gradients and weights are per-rank shards)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def wrap_model(model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """DDP through Ray Train, or FSDP with one unit per transformer block.

    Ray's ``prepare_model(parallel_strategy="fsdp")`` refuses to run without a GPU, while torch's
    FSDP runs on CPU (gloo) as well; wrapping here keeps one code path, tested on CPU.
    """
    if cfg.scaling.strategy != "fsdp":
        import ray.train.torch  # here: the rest of this module runs without Ray

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # transformers names the blocks that must not be split (e.g. LlamaDecoderLayer).
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
    return FullyShardedDataParallel(
        model.to(device), device_id=device, use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy(blocks) if blocks else None,
        mixed_precision=fsdp_mixed_precision(cfg.model.dtype, device),
    )


def build_model(cfg: FinetuneConfig, num_labels: int | None) -> torch.nn.Module:
    """The model to train: the base in ``model.dtype``, the method applied, trainable weights in fp32."""
    base = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    model = apply_method(base, cfg.method, num_labels=num_labels)
    if cfg.train.grad_checkpointing and hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable()
    keep_trainable_fp32(model)  # master weights (lorafleet.precision)
    return model


def optimizer_steps(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: FinetuneConfig, *,
                    device: torch.device, optimizer: torch.optim.Optimizer, scheduler, params: list[torch.Tensor],
                    precision: Precision) -> Iterator[tuple[torch.Tensor, int]]:
    """One epoch of optimizer steps over ``batches``; yields (last micro-batch loss, tokens) after each.

    Micro-steps that only accumulate skip DDP's/FSDP's gradient all-reduce (``no_sync``); a partial
    accumulation left at the end of the epoch is dropped, not added into the next epoch's first step.
    """
    is_head = isinstance(unwrap(model), HeadClassifier)
    accum, scaler = cfg.train.grad_accum, precision.scaler
    micro, tokens = 0, 0
    for batch in batches:
        micro += 1
        sync = micro % accum == 0
        no_sync = getattr(model, "no_sync", None)
        with (contextlib.nullcontext() if sync or no_sync is None else no_sync()):
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with precision.autocast():
                if is_head:
                    logits = model(input_ids, mask)
                    loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 0].to(device))
                else:
                    loss = model(input_ids=input_ids, attention_mask=mask, labels=batch["labels"].to(device)).loss
            scaled = loss / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        tokens += int(mask.sum())
        if not sync:
            continue
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients
        if is_fsdp(model):  # each rank holds a shard of the gradients: FSDP computes the global norm
            model.clip_grad_norm_(cfg.train.max_grad_norm)
        else:
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

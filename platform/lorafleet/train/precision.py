"""Mixed precision for training: fp32 master weights, low-precision compute.

The policy (one for every method, CPU and GPU alike):
- The model loads in ``model.dtype``; the parameters that train are then kept in fp32 (the master
  weights), so AdamW's state is fp32 too and a small step (lr 1e-5) is not rounded away, as it is
  on bf16 weights. Frozen weights (LoRA's base, head's base, partial's lower blocks) stay in
  ``model.dtype`` and keep the memory saving. Most hub checkpoints are stored in bf16, so loading in
  bf16 and upcasting loses nothing.
- The forward (training and validation) runs under ``torch.autocast`` in the compute dtype; FSDP
  also gathers the parameters in it (``MixedPrecisionPolicy``) and reduces gradients in fp32.
- fp16 has a narrow range: its losses are scaled by a GradScaler (FSDP: ShardedGradScaler).
- ``model.dtype: float32`` computes in fp32 on CPU, and in bf16 on a GPU (fp16 + GradScaler on a
  GPU without bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Precision", "compute_dtype", "keep_trainable_fp32", "training_precision"]


@dataclass
class Precision:
    """How one worker computes: the autocast dtype (None: plain fp32) and the loss scaler (fp16 only)."""

    dtype: torch.dtype | None
    device_type: str
    scaler: Any = None  # torch.amp.GradScaler or FSDP's ShardedGradScaler

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The dtype the forward runs in for `model.dtype` on `device`; None: plain fp32 (see the module docstring)."""
    if device.type != "cuda":
        return None if dtype == "float32" else getattr(torch, dtype)
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype == "bfloat16" and not bf16_ok:
        raise ValueError(
            "model.dtype 'bfloat16' needs a GPU with bf16 support (compute capability 8.0+) and this "
            "GPU has none; use 'float16' (trained with loss scaling) or 'float32'"
        )
    if dtype == "float32":  # the GPU default: autocast, in bf16 where the GPU has it
        return torch.bfloat16 if bf16_ok else torch.float16
    return getattr(torch, dtype)


def training_precision(dtype: str, device: torch.device, sharded: bool = False) -> Precision:
    """The precision a worker trains with for ``model.dtype`` on ``device`` (see the module docstring)."""
    compute = compute_dtype(dtype, device)
    scaler = None
    if compute == torch.float16:
        if sharded:  # FSDP's scaler finds infs across every rank's shard
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device.type)
        else:
            scaler = torch.amp.GradScaler(device.type)
    return Precision(dtype=compute, device_type=device.type, scaler=scaler)


def keep_trainable_fp32(model: nn.Module) -> None:
    """Upcast the trainable parameters to fp32 (master weights); frozen ones keep their dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()

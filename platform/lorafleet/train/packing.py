"""Sequence packing (`data.packing`): encoded rows concatenated into blocks of `data.max_seq_len` tokens,
each row still seeing only itself.

A packed block carries, per token: `input_ids`, `labels` (the row's own, except that the first token of
every row carries no loss: it would be predicted from the row before it), `position_ids` (restarting at 0
with every row, as each row had alone) and `attention_mask` (1 on a row's tokens, 0 on the block's padded
tail, which only counts tokens here). `model_inputs` then keeps attention inside each row:

* sdpa (and eager): a 4D block-diagonal causal mask, [batch, 1, tokens, tokens], which transformers hands
  to the attention as it is (boolean for sdpa, additive for eager). The padded tail is a segment of its
  own, so no query row is fully masked (SDPA would return NaN for it).
* flash_attention_2: the batch flattened into one sequence with the rows' boundaries as FlashAttention's
  `cu_seq_lens_q/k` and `max_length_q/k` (transformers' padding-free path, what its
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` passes): the variable-length kernel, no mask.

Rows are placed best-fit decreasing (TRL's "bfd"): longest first, each into the fullest block it still
fits; a row is never split (every row is at most `max_seq_len` tokens after `data.truncate`).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

from lorafleet.data import IGNORE_INDEX

__all__ = ["pack_rows", "packed_blocks", "model_inputs", "block_mask"]


def pack_rows(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Row indices per block, best-fit decreasing: each row (longest first) goes into the block with the
    least room that still holds it, else a new block. Within a block, rows keep their first-placed order."""
    if any(n > max_seq_len for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a block of max_seq_len={max_seq_len}")
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_seq_len, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return blocks


def packed_blocks(encoded: list[dict[str, list[int]]], max_seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """`encoded` rows (`lorafleet.data.encode_rows`) packed into blocks of `max_seq_len` tokens, as
    fixed-width arrays (see the module doc for each field)."""
    out = []
    for block in pack_rows([len(r["input_ids"]) for r in encoded], max_seq_len):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in block:
            row = encoded[i]
            if len(row["labels"]) != len(row["input_ids"]):
                raise ValueError("packing needs per-token labels (a causal LM's), not a head's label index")
            ids += row["input_ids"]
            labels += [IGNORE_INDEX] + row["labels"][1:]  # never predicted across the row boundary
            positions += range(len(row["input_ids"]))
        n, pad = len(ids), max_seq_len - len(ids)
        out.append({
            "input_ids": np.array(ids + [pad_id] * pad, dtype=np.int64),
            "attention_mask": np.array([1] * n + [0] * pad, dtype=np.int64),
            "labels": np.array(labels + [IGNORE_INDEX] * pad, dtype=np.int64),
            "position_ids": np.array(positions + list(range(pad)), dtype=np.int64),
        })
    return out


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, which row of its block it belongs to (a new one wherever the positions restart at 0)."""
    return (position_ids == 0).cumsum(dim=-1)


def block_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [batch, 1, tokens, tokens] causal mask that keeps attention inside each row: boolean (True:
    may attend), or additive in `dtype` (0 or the dtype's lowest value) for eager attention."""
    seg = _segments(position_ids)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def flash_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """FlashAttention's varlen arguments for a flattened packed batch: where each row starts (and the end)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, attn_implementation: str | None) -> dict[str, Any]:
    """The keyword arguments of a causal LM's forward for `batch` (on `device`): a padded batch's ids, mask
    and labels as they are; a packed one (it has `position_ids`) with its rows kept apart for the model's
    attention implementation (see the module doc)."""
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    if "position_ids" not in batch:
        return {"input_ids": ids, "attention_mask": batch["attention_mask"].to(device), "labels": labels}
    positions = batch["position_ids"].to(device)
    if attn_implementation and "flash" in attn_implementation:
        # no cache: with one, transformers would not read rows from position_ids (nor need to, given cu_seq_lens)
        return {"input_ids": ids.reshape(1, -1), "labels": labels.reshape(1, -1), "use_cache": False,
                "position_ids": positions.reshape(1, -1), **flash_kwargs(positions)}
    dtype = None if attn_implementation in (None, "sdpa") else torch.float32
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": block_mask(positions, dtype)}

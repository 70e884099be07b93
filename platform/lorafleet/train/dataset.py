"""The data pipeline of a run: encoded rows padded into a Ray Dataset (sharded by Ray Train), the
per-batch collate that trims unneeded padding, and the learning-rate schedule."""

from __future__ import annotations

import numpy as np
import torch

import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from lorafleet.config import FinetuneConfig
from lorafleet.data import IGNORE_INDEX, DataError

__all__ = ["TrimPaddingCollate", "build_dataset", "build_scheduler", "collate"]


def build_dataset(encoded: list[dict[str, list[int]]], pad_id: int, cfg: FinetuneConfig | None = None) -> ray.data.Dataset:
    """Pad to one width (so rows are fixed-size arrays) and hand them to Ray Data for sharding.

    With ``cfg``: its ``data.packing`` packs the rows into blocks of ``data.max_seq_len`` tokens instead
    (``lorafleet.train.packing``), each a dataset row (a batch is then ``train.batch_size`` blocks); and a
    split too small for one optimizer step on every worker is a DataError (the loop would find no batch).
    """
    if cfg is not None and cfg.data.packing:
        from lorafleet.train.packing import packed_blocks

        blocks = packed_blocks(encoded, cfg.data.max_seq_len, pad_id)
        _check_one_step(len(blocks), cfg, f"{len(encoded)} rows packed into {len(blocks)} blocks of "
                        f"data.max_seq_len={cfg.data.max_seq_len} tokens", "train.batch_size or data.max_seq_len")
        return ray.data.from_items(blocks)
    if cfg is not None:
        _check_one_step(len(encoded), cfg, f"{len(encoded)} rows", "train.batch_size")
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


def _check_one_step(n: int, cfg: FinetuneConfig, what: str, lower: str) -> None:
    # Ray Train gives each worker an equal share and batches drop their remainder (drop_last)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers
    if n < per_step:
        raise DataError(f"the training split is {what}: fewer than one optimizer step takes (train.batch_size x "
                        f"train.grad_accum x scaling.num_workers = {per_step}); lower {lower}, or add rows")


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch of padded rows as tensors, cut to its longest row: most steps then run on short sequences."""
    width = int(batch["attention_mask"].sum(axis=1).max())
    out = {k: torch.as_tensor(v) for k, v in batch.items()}
    out["input_ids"] = out["input_ids"][:, :width]
    out["attention_mask"] = out["attention_mask"][:, :width]
    if "position_ids" in out:  # packed blocks (their padding is at the end too)
        out["position_ids"] = out["position_ids"][:, :width]
    if out["labels"].shape[1] > 1:  # causal LM labels align with input_ids; head labels are one index
        out["labels"] = out["labels"][:, :width]
    return out


class TrimPaddingCollate(NumpyBatchCollateFn):
    """Ray Data's collate hook (a class: plain functions are deprecated since Ray 2.47)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch)


# config's train.schedule -> transformers' scheduler name (each with linear warmup)
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over `train.warmup_steps`, then cosine or linear decay to 0 at `train.max_steps`,
    or constant: transformers' schedules, as the HF Trainer builds them."""
    from transformers import get_scheduler

    return get_scheduler(_SCHEDULES[cfg.train.schedule], optimizer, num_warmup_steps=cfg.train.warmup_steps,
                         num_training_steps=cfg.train.max_steps)

"""Sharded full fine-tuning (`scaling.strategy: fsdp`) on 2 CPU workers (torch FSDP over gloo).

FSDP must train exactly what DDP trains (same data, seed and steps: same losses), and what it saves
(the registered model and the checkpoint's optimizer state) must be the full, unsharded tensors,
gathered from both ranks. Resuming a sharded run after a killed driver is covered in
test_fault_tolerance.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import last_json, run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "--set", "method.name=full", "--set", "scaling.num_workers=2", "--set", "train.max_steps=10",
    "--set", "train.eval_every=10", "--set", "train.log_every=5", "--set", "train.eval_samples=8",
    "--set", "train.lr=5e-4", "--set", "data.synthetic_sizes={train: 200, validation: 8, test: 16}",
]


def _losses(run_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def test_fsdp_trains_what_ddp_trains_and_saves_full_tensors(env, base_model):
    from safetensors.torch import load_file

    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = last_json(run_cli(
            ["train", "configs/tiny/classification-lora.yaml", "--quiet", "--json", "--set", f"name={strategy}-full",
             "--set", f"scaling.strategy={strategy}", *SMALL], env, timeout=600).stdout)
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert fsdp["steps"] == 10 and fsdp["registered"] == "fsdp-full@1" and len(fsdp["worker_nodes"]) == 2
    assert _losses(fsdp["run_dir"]) == pytest.approx(_losses(ddp["run_dir"]), rel=1e-4)
    assert fsdp["test_metrics"] == pytest.approx(ddp["test_metrics"], abs=1e-9)

    # The artifact: every weight of the base model, full shape, trained (not the initial values).
    base = load_file(str(base_model / "model.safetensors"))
    saved = load_file(str(Path(fsdp["artifact_dir"]) / "model.safetensors"))
    assert saved.keys() == base.keys()
    assert all(saved[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    want = load_file(str(Path(ddp["artifact_dir"]) / "model.safetensors"))
    assert all(torch.allclose(saved[k], want[k], atol=1e-5) for k in want)

    # The checkpoint's optimizer state is unsharded too: one AdamW moment per weight, full shape.
    ckpt = max(Path(fsdp["run_dir"]).glob("checkpoint_*/"), key=lambda p: p.name)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    moments = sorted(tuple(s["exp_avg"].shape) for s in state.values())
    assert moments == sorted(tuple(t.shape) for t in base.values())

"""The train, eval and serve paths on one GPU, in bf16 (run where CUDA is present; skipped elsewhere).

The same paths run on CPU in tests/test_dtype.py; these check the device half of the story: the
model, the batches and the scoring all on the GPU, and vLLM serving a trained adapter there.
"""

from __future__ import annotations

import pytest
import torch

from helpers import last_json, run_cli
from lorafleet.config import parse_config
from lorafleet.evaluate import evaluate_rows, load_for_eval, run_device
from lorafleet.train.precision import training_precision
from lorafleet.train.steps import build_model, optimizer_steps
from lorafleet.tasks import get_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch sees no GPU on this machine"),
]

LABELS = ["billing", "technical", "account", "shipping"]


def test_full_step_on_gpu_in_bf16_changes_the_weights(base_model, tmp_path):
    cfg = parse_config({"model": {"name_or_path": str(base_model), "dtype": "bfloat16"}, "method": {"name": "full"},
                        "train": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant"},
                        "scaling": {"use_gpu": True, "num_workers": 1}}, home=tmp_path)
    device = torch.device("cuda")
    model = build_model(cfg, None).to(device)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    precision = training_precision(cfg.model.dtype, device)
    assert precision.dtype == torch.bfloat16 and precision.scaler is None
    ids = torch.randint(5, 500, (4, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    steps = list(optimizer_steps(model, [batch], cfg, device=device, optimizer=optimizer, scheduler=scheduler,
                                 params=params, precision=precision))
    assert len(steps) == 1 and torch.isfinite(steps[0][0])
    moved = (model.model.layers[0].mlp.up_proj.weight.detach() != before).float().mean().item()
    assert moved > 0.9


def test_eval_loads_in_the_runs_dtype_on_the_gpu(base_model):
    from lorafleet.data import read_split

    model, tok, _ = load_for_eval(None, str(base_model), "bfloat16", device=run_device(True))
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    task = get_task("classification")
    rows = [ex.row for ex in read_split("synthetic", task, "test", synthetic_n=8, seed=0)]
    assert 0.0 <= evaluate_rows(model, tok, task, rows, LABELS)["accuracy"] <= 1.0


@pytest.mark.slow
def test_train_eval_and_serve_a_bf16_adapter_on_one_gpu(env, tmp_path):
    pytest.importorskip("vllm")
    steps = ["--set", "train.max_steps=40", "--set", "train.eval_every=40", "--set", "scaling.num_workers=1",
             "--set", "scaling.use_gpu=true", "--set", "model.dtype=bfloat16", "--set", "name=gpu-bf16"]
    summary = last_json(run_cli(["train", "configs/tiny/classification-lora.yaml", "--quiet", "--json", *steps],
                                env, timeout=900).stdout)
    assert summary["registered"] == "gpu-bf16@1"
    metrics = last_json(run_cli(["eval", "gpu-bf16@1", "--json"], env).stdout)["metrics"]
    assert metrics == pytest.approx(summary["test_metrics"], abs=0.02)  # same dtype and device as the run

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base = summary["artifact_dir"]  # the adapter; its base model is the tiny home model
    llm = LLM(model=str(env["LORAFLEET_HOME"]) + "/models/tiny", enable_lora=True, max_lora_rank=8, max_loras=1,
              dtype="bfloat16", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.2)
    out = llm.generate(["<|user|>\nMy card was charged twice\n<|assistant|>\n"],
                       SamplingParams(max_tokens=4, temperature=0), lora_request=LoRARequest("a", 1, base))
    assert out[0].outputs[0].token_ids

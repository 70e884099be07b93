"""QLoRA (`method.lora.quantize: nf4`, issue 30 item 4): LoRA on a 4-bit NF4 base through bitsandbytes, which
runs on this CPU (bitsandbytes 0.50, torch 2.13; ../shared/ENV.md).

* The 4-bit base as a worker builds it: the decoder blocks' linear layers are NF4, the adapter trains, and
  the planner's weight bytes (lorafleet.train.memory) are within 2% of the bytes the model holds.
* The config refuses what cannot work, all at once: another method, FSDP2.
* End to end on Ray Train: a QLoRA run registers an adapter, scored on the test split on the unquantized
  base (what serving loads: vLLM serves a QLoRA adapter on the full-precision base, as is usual).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.config import ConfigError, parse_config

CONFIG = {"method": {"name": "lora", "lora": {"quantize": "nf4", "r": 8, "target_modules": ["q_proj", "v_proj"]}}}


def _cfg(base: Path, home: Path, **extra):
    raw = {"model": {"name_or_path": str(base)}, **CONFIG, **extra}
    return parse_config(raw, "test", home=home)


def test_nf4_base_trains_an_adapter_and_the_planner_counts_its_bytes(base_model, tmp_path):
    from bitsandbytes.nn import Params4bit

    from lorafleet.train.memory import model_shape, training_parts
    from lorafleet.train.steps import build_model

    cfg = _cfg(base_model, tmp_path)
    model = build_model(cfg, None, device=torch.device("cpu"))
    four_bit = [p for p in model.parameters() if isinstance(p, Params4bit)]
    assert len(four_bit) == 4 * 7  # every linear layer of the 4 decoder blocks; the output layer stays whole
    held = sum(p.numel() * p.element_size() + (p.quant_state.absmax.numel() * 4 if isinstance(p, Params4bit) else 0)
               for p in model.parameters())
    planned = next(p.bytes for p in training_parts(cfg, model_shape(cfg), on_gpu=False) if p.name == "weights")
    print(f"QLoRA tiny model weights: planned {planned:,} bytes, held {held:,}")
    assert abs(planned - held) <= 0.02 * held

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_qlora_config_problems_are_reported_together(base_model, tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(base_model, tmp_path, scaling={"strategy": "fsdp", "num_workers": 2}, method={
            "name": "full", "lora": {"quantize": "nf4"}})
    text = str(err.value)
    assert "quantizes the frozen base of method 'lora' (got 'full')" in text
    assert "needs scaling.strategy 'ddp'" in text


@pytest.mark.slow
def test_qlora_run_registers_an_adapter_served_on_the_unquantized_base(home, ray_local):
    from safetensors.torch import load_file

    from lorafleet.registry import Registry
    from lorafleet.train.recipe import finetune

    raw = {"name": "qlora-tickets", **CONFIG, "task": {"name": "classification"},
           "train": {"max_steps": 10, "eval_every": 10, "eval_samples": 8, "batch_size": 8, "lr": 2e-3},
           "data": {"synthetic_sizes": {"train": 160, "validation": 8, "test": 16}},
           "scaling": {"num_workers": 2}}
    summary = finetune(parse_config(raw, "test", home=home), registry_root=home / "registry", progress=False)
    assert summary.registered == "qlora-tickets@1" and summary.steps == 10
    entry = Registry(home / "registry").resolve(summary.registered)
    assert entry.meta.config["method"]["lora"]["quantize"] == "nf4"
    adapter = load_file(str(entry.path / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: B left zero
    # The test metrics come from the adapter on the unquantized base, as serving loads it.
    assert set(summary.test_metrics) == {"accuracy", "macro_f1"}

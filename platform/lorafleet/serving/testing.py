"""Helpers for serving tests and benchmarks: random LoRA adapters and the transformers+peft
reference that serving answers must equal token for token (fp32, greedy).

Not used by the server itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafleet.base_model import load_model, load_tokenizer
from lorafleet.evaluate import generate

__all__ = ["greedy_ids", "make_lora_adapter", "register_random_adapter", "reference_greedy"]


def make_lora_adapter(base: str | Path, out: str | Path, *, seed: int, r: int = 8) -> Path:
    """Save a peft LoRA adapter with random (non-zero) A and B, so it visibly changes outputs.

    Args:
        base: Base model folder.
        out: Folder to write ``adapter_config.json`` + ``adapter_model.safetensors`` into.
        seed: Different seeds give different adapters.
        r: LoRA rank (must be <= the server's ``max_lora_rank``).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(str(base), "float32")
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0, init_lora_weights=False,  # random B too, so the adapter matters
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # scale up so a few greedy tokens differ from the base model's
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(str(out))
    return Path(out)


def register_random_adapter(registry: Any, name: str, base: str | Path, work: str | Path, *, seed: int,
                            task: str = "classification", promote: bool = False) -> Any:
    """Make a random adapter and register it under ``name`` (returns the registry Entry)."""
    src = make_lora_adapter(base, Path(work) / f"{name}-{seed}", seed=seed)
    labels = ["billing", "technical", "account", "shipping"] if task == "classification" else []
    meta = {"task": task, "method": "lora", "labels": labels, "base_model": str(base), "config": {}}
    return registry.register(name, src, meta, promote=promote)


def reference_greedy(base: str | Path, adapter: str | Path | None, prompts: list[list[int]],
                     max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) from transformers (+ peft), fp32.

    One prompt at a time (no padding), so nothing but the model decides the tokens.
    """
    model = load_model(str(base), "float32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return greedy_ids(model, load_tokenizer(str(base)), prompts, max_new_tokens)


def greedy_ids(model: torch.nn.Module, tok: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`reference_greedy` on a model already loaded (e.g. a PeftModel, or one under ``disable_adapter()``)."""
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, len(ids):].tolist()
            if tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id)]
            out.append(gen)
    return out


# Keep `generate` importable from here for callers that want decoded text instead of ids.
_ = generate

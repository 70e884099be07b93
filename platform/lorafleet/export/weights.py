"""The tensors of an export: a LoRA adapter merged into its base, and dtype conversion.

Everything here works on local folders (a checked copy of the registry version and the base model);
where they come from and where the result goes is ``flow.py``'s business.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lorafleet.base_model import load_model

__all__ = ["DTYPES", "canonical_dtype", "convert_adapter", "copy_model", "folder_dtype", "merge_lora"]

# Command-line spellings -> the torch dtype names config.json and `model.dtype` use.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

_TOKENIZER_SKIP = ("config.json", "model.safetensors", "model.safetensors.index.json")


def canonical_dtype(name: str) -> str:
    """``bf16`` / ``bfloat16`` -> ``bfloat16`` (and fp16, fp32); ValueError naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def folder_dtype(folder: Path) -> str:
    """The dtype a model folder's config.json records (``dtype``, or the older ``torch_dtype``); float32
    when it records none it can name."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in ("bfloat16", "float16", "float32") else "float32"


def merge_lora(base: Path, adapter: Path, out: Path, dtype: str) -> None:
    """Merge the peft adapter at ``adapter`` into the base at ``base`` and save an HF folder in ``out``.

    The merge runs in fp32 (W + scale * B @ A computed once, then rounded to ``dtype``), so a bf16 export
    is rounded once instead of merged from rounded parts. ``out`` gets config.json, safetensors weights,
    generation_config.json and the base's tokenizer files (chat template included)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(load_model(str(base), "float32"), str(adapter))
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of saving them
    _save_model(merged, out, dtype)
    # The base's tokenizer as it is (load_tokenizer would invent a pad token where the base has none).
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))


def copy_model(src: Path, out: Path, dtype: str | None) -> None:
    """Copy the whole HF model folder ``src`` (a full or partial fine-tune) to ``out``, its weights
    converted to ``dtype`` when that differs from what they are stored in (None: as stored)."""
    if dtype is None or dtype == folder_dtype(src):
        shutil.copytree(src, out, dirs_exist_ok=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():  # tokenizer, chat template, generation config: as they are
        if file.is_file() and file.name not in _TOKENIZER_SKIP and not file.name.endswith(".safetensors"):
            shutil.copy2(file, out / file.name)
    _save_model(load_model(str(src), "float32"), out, dtype)


def _save_model(model: torch.nn.Module, out: Path, dtype: str) -> None:
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype  # what vLLM's dtype="auto" and transformers' dtype="auto" load it in
    model.save_pretrained(str(out), safe_serialization=True)


def convert_adapter(file: Path, dtype: str) -> None:
    """Cast the floating tensors of a peft ``adapter_model.safetensors`` to ``dtype``, in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    target = getattr(torch, dtype)
    tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(tensors, str(file), metadata=metadata or {"format": "pt"})

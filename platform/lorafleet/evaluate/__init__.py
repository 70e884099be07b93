"""Scoring any model on a task split: load it (`load_for_eval`, `open_for_eval`), answer and score its
rows (`scoring`: greedy generation, label probabilities, loss), score a registered artifact as
`lorafleet eval` does (`evaluate_artifact`).

``eval.engine`` picks what answers: ``hf``, the transformers model in this process (or the run's GPU
task), or ``vllm``, an offline vLLM engine (`lorafleet.offline_engine`), which computes the same answers
in batched steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.base_model import load_model, load_tokenizer
from lorafleet.cluster import on_run_accelerator
from lorafleet.evaluate.scoring import (
    evaluate_rows,
    generate,
    head_predict,
    label_probs,
    last_token_features,
    lm_loss,
    predict,
)
from lorafleet.head import HeadClassifier
from lorafleet.tasks import Task

__all__ = [
    "generate",
    "label_probs",
    "predict",
    "evaluate_rows",
    "evaluate_artifact",
    "load_for_eval",
    "open_for_eval",
    "artifact_kind",
    "head_predict",
    "last_token_features",
    "lm_loss",
    "run_device",
]


def run_device(use_gpu: bool) -> torch.device:
    """Where a run's model is scored: its GPU when it trained on one and this process has one."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def load_for_eval(artifact: str | Path | None, base: str, dtype: str = "float32",
                  device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load the bare base model, a LoRA adapter, a full model folder, or a head, for evaluation.

    Pass the run's ``model.dtype`` and device (:func:`run_device`): a bf16 run is scored in bf16.
    Returns (model, tokenizer, info) where info has 'kind' and, for heads, 'labels'.
    """
    model, tokenizer, info = _load_for_eval(artifact, base, dtype)
    return model.to(device), tokenizer, info


def artifact_kind(artifact: str | Path | None) -> str:
    """'base' (None), 'lora', 'head', 'feature' or 'full': what a model folder holds, by its files."""
    if artifact is None:
        return "base"
    for kind, marker in (("lora", "adapter_config.json"), ("head", "head.json"), ("feature", "feature.json")):
        if (Path(artifact) / marker).exists():
            return kind
    return "full"


@contextmanager
def open_for_eval(artifact: str | Path | None, cfg: Any) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """(model, tokenizer, info) to score ``artifact`` (None: the bare base) as ``cfg`` says, released after.

    ``cfg.eval.engine`` 'hf': `load_for_eval` in the run's dtype on its device. 'vllm': an offline vLLM
    engine on the base (with the LoRA adapter) or on a full model's folder, stopped when the block ends;
    a head or feature artifact has no language-model answers and is always scored by transformers."""
    kind = artifact_kind(artifact)
    if cfg.eval.engine == "hf" or kind in ("head", "feature"):
        yield load_for_eval(artifact, cfg.model.name_or_path, cfg.model.dtype, run_device(cfg.scaling.use_gpu))
        return
    from lorafleet.offline_engine import open_engine

    model_dir = str(artifact) if kind == "full" else cfg.model.name_or_path
    engine = open_engine(model_dir, artifact if kind == "lora" else None, dtype=cfg.model.dtype,
                         max_model_len=cfg.eval.max_model_len, kv_cache_gib=cfg.eval.kv_cache_gib,
                         use_gpu=cfg.scaling.use_gpu)
    try:
        yield engine, load_tokenizer(model_dir), {"kind": kind, "engine": "vllm"}
    finally:
        engine.close()


def _load_for_eval(artifact: str | Path | None, base: str, dtype: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    kind = artifact_kind(artifact)
    if kind == "base":
        return load_model(base, dtype), load_tokenizer(base), {"kind": "base"}
    artifact = Path(artifact)
    if kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base, dtype), artifact)
        return model, load_tokenizer(base), {"kind": "lora"}
    if kind == "head":
        from safetensors.torch import load_file

        info = json.loads((artifact / "head.json").read_text())
        model = HeadClassifier(load_model(base, dtype), len(info["labels"]))
        model.head.load_state_dict(load_file(artifact / "head.safetensors"))
        return model, load_tokenizer(base), {"kind": "head", **info}
    if kind == "feature":
        info = json.loads((artifact / "feature.json").read_text())
        return load_model(base, dtype), load_tokenizer(base), {"kind": "feature", **info}
    return load_model(str(artifact), dtype), load_tokenizer(str(artifact)), {"kind": "full"}


def _feature_predict(model: nn.Module, tokenizer, task: Task, rows: list[dict[str, Any]], artifact: Path, labels: list[str]) -> list[str]:
    from safetensors.torch import load_file

    from lorafleet.data import prompt_ids

    weights = load_file(artifact / "feature.safetensors")
    feats = last_token_features(model, tokenizer, [prompt_ids(tokenizer, task.instruction(r)) for r in rows])
    logits = feats @ weights["coef"].T + weights["intercept"]
    if logits.shape[1] == 1:  # sklearn stores one column for two classes
        logits = torch.cat([-logits, logits], dim=1)
    return [labels[i] for i in logits.argmax(-1).tolist()]


def evaluate_artifact(
    ref: str,
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    split: str = "test",
    home: Path | str | None = None,
    limit: int | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Score a registered artifact ('name', 'name@version') or the bare base model ('base') on a split.

    The artifact's own resolved config supplies base model, task and data unless `config` is given.
    """
    from lorafleet.config import apply_overrides, home_location, load_config, parse_config, registry_root
    from lorafleet.data import read_data_split
    from lorafleet.registry import Registry, RegistryError
    from lorafleet.tasks import get_task

    home = home or home_location()  # a folder, or s3://... (its registry is then there)
    artifact: Path | None = None
    if ref == "base":
        if not config:
            raise ValueError("evaluating 'base' needs --config (for the base model, task and data)")
        cfg = load_config(config, overrides, home)
    else:
        registry = Registry(registry_root(home))
        entry = registry.resolve(ref)
        artifact = registry.local_path(entry)  # checked: never score a tampered or half-copied artifact
        if config:
            cfg = load_config(config, overrides, home)
        elif entry.meta.config is None:
            raise RegistryError(f"{entry.ref} records no training config in its metadata; pass --config "
                                "(the base model, task and data to score it with)")
        else:
            cfg = parse_config(apply_overrides(entry.meta.config, overrides or []), f"{entry.ref} metadata", home)
    task = get_task(cfg.task)  # configured: the run's labels, languages and instruction
    labels = list(task.labels) or None
    rows = [ex.row for ex in read_data_split(cfg.data, task, split)][:limit]
    # Where the run's model lives: a GPU run is scored in a Ray task holding a GPU, not on this process.
    score = on_run_accelerator(_score_artifact, use_gpu=cfg.scaling.use_gpu, cpus=cfg.scaling.cpus_per_worker)
    kind, metrics = score(artifact, cfg, task, rows, labels)
    result = {"artifact": ref, "kind": kind, "task": task.name, "split": split, "rows": len(rows),
              "engine": cfg.eval.engine if kind not in ("head", "feature") else "hf", "metrics": metrics}
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def _score_artifact(artifact: Path | None, cfg: Any, task: Task, rows: list[dict[str, Any]],
                    labels: list[str] | None) -> tuple[str, dict[str, float]]:
    """(kind, metrics) of `artifact` (None: the base model) on `rows`, on the run's device (or engine)."""
    with open_for_eval(artifact, cfg) as (model, tokenizer, info):
        if info["kind"] == "feature":
            return "feature", task.score(_feature_predict(model, tokenizer, task, rows, artifact, info["labels"]), rows)
        return info["kind"], evaluate_rows(model, tokenizer, task, rows, info.get("labels") or labels)

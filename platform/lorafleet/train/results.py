"""What a run produced, and what becomes of it: `RunSummary`, scoring a saved model on a split as
`lorafleet eval` does, the registry metadata of an artifact, and registering it."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorafleet.base_model import base_fingerprint, load_tokenizer
from lorafleet.config import FinetuneConfig
from lorafleet.evaluate import evaluate_rows, open_for_eval
from lorafleet.registry import ArtifactMetadata, Registry
from lorafleet.tasks import GENERATING_TASKS, get_task
from lorafleet.train.checkpoint import MODEL_DIR, export_shards
from lorafleet.train.context import task_labels
from lorafleet.train.fsdp import SHARDS_DIR

__all__ = ["Measures", "RunSummary", "checkpoint_artifact", "artifact_metadata", "dir_bytes", "register_artifact", "run_metadata", "score_checkpoint", "score_model_dir"]


@dataclass(kw_only=True)
class Measures:
    """What a run measured, whoever ran it: the result shape training (`RunSummary`) and the method
    ladder (`lorafleet.compare.RungResult`) share."""

    test_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    wall_time_s: float
    steps: int = 0
    peak_memory_mb: float = 0.0  # rank 0's peak (RSS on CPU, max allocated on GPU)
    tokens_per_s: float = 0.0  # mean over the logged windows
    artifact_bytes: int = 0
    run_dir: str | None = None
    artifact_dir: str | None = None  # the best checkpoint's model: <run_dir>/artifact for a local run
    registered: str | None = None  # "name@version"

    def measures(self) -> dict[str, Any]:
        """Just the shared measures, e.g. to build a ladder row from a training run's summary."""
        return {f.name: getattr(self, f.name) for f in fields(Measures)}


@dataclass(kw_only=True)
class RunSummary(Measures):
    """What a finished training run produced."""

    run_name: str
    method: str
    task: str
    worker_nodes: list[str] = field(default_factory=list)  # Ray node id of each rank
    history: list[dict[str, Any]] = field(default_factory=list)
    tracking_run_id: str | None = None  # its MLflow run, when tracked (not in summary.json)

    def as_dict(self) -> dict[str, Any]:
        """The summary as `summary.json` and `--json` print it: every field but the history, run_name
        first (scripts find the line by it), in the order these keys have always had."""
        return {k: getattr(self, k) for k in _SUMMARY_KEYS}


_SUMMARY_KEYS = ("run_name", "run_dir", "method", "task", "test_metrics", "trainable_params", "total_params",
                 "wall_time_s", "steps", "artifact_dir", "peak_memory_mb", "tokens_per_s", "artifact_bytes",
                 "worker_nodes", "registered")


def score_model_dir(model_dir: str | Path, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                    labels: list[str] | None) -> dict[str, float]:
    """The task's metrics for a saved model folder on `rows`, computed as `lorafleet eval` computes
    them (same loader, dtype and device, or the same vLLM engine settings), so re-evaluating a registered
    version gives the same number."""
    with open_for_eval(Path(model_dir), cfg) as (model, tok, _):  # eval.engine: transformers or vLLM
        return evaluate_rows(model, tok, task_labels(cfg)[0], rows, labels)


def score_checkpoint(checkpoint: Any, cfg: FinetuneConfig, rows: list[dict[str, Any]],
                     labels: list[str] | None) -> dict[str, float]:
    """`score_model_dir` for a Ray Train checkpoint's model (the test split, for the artifact)."""
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="lorafleet-score-") as tmp:
        return score_model_dir(checkpoint_artifact(Path(d), cfg, Path(tmp) / MODEL_DIR), cfg, rows, labels)


def checkpoint_artifact(ckpt: Path, cfg: FinetuneConfig, out: Path) -> Path:
    """The artifact of checkpoint folder `ckpt` in `out` (replaced): its `model/` copied (DDP), or
    exported once from every rank's shards in the run's dtype (FSDP2)."""
    shutil.rmtree(out, ignore_errors=True)
    if (ckpt / MODEL_DIR).is_dir():
        shutil.copytree(ckpt / MODEL_DIR, out)
        return out
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    return export_shards(ckpt / SHARDS_DIR, cfg, tokenizer, out)


def dir_bytes(path: str | Path | None) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def artifact_metadata(cfg: FinetuneConfig, labels: list[str] | None, *, test_metrics: dict[str, float],
                      trainable_params: int, wall_time_s: float, steps: int | None, run_dir: str | None,
                      total_params: int | None = None) -> ArtifactMetadata:
    """The registry metadata of an artifact `cfg` trained: what it is, how it scored, and its config.

    Serving reads `labels` (classification), `source_lang`/`target_lang` (translation) and
    `max_new_tokens` (its default answer budget) from it, and refuses the artifact on a base whose
    fingerprint differs from `base_fingerprint` (`base_model.base_fingerprint`: config.json, weights
    index, weight file names, sizes and samples). Languages are recorded for translation only, the
    budget for the tasks that generate an answer (not classification, not text); `total_params` only
    when known (a sweep's trial does not report it).
    """
    task = get_task(cfg.task)
    translation = cfg.task.name == "translation"
    languages = dict(source_lang=task.source_lang, target_lang=task.target_lang) if translation else {}
    budget = dict(max_new_tokens=task.max_new_tokens) if task.name in GENERATING_TASKS else {}
    known = dict(total_params=total_params) if total_params is not None else {}
    return ArtifactMetadata(
        base_model=cfg.model.name_or_path, base_fingerprint=base_fingerprint(cfg.model.name_or_path),
        task=cfg.task.name, method=cfg.method.name, labels=labels, **languages, **budget,
        metrics={"test": test_metrics}, trainable_params=trainable_params, **known,
        wall_time_s=wall_time_s, steps=steps, run=run_dir, config=cfg.model_dump(mode="json"),
    )


def run_metadata(cfg: FinetuneConfig, summary: RunSummary, labels: list[str] | None) -> dict[str, Any]:
    """`artifact_metadata` of a finished run, as the JSON-ready dict `lorafleet.json` holds."""
    return artifact_metadata(cfg, labels, test_metrics=summary.test_metrics, trainable_params=summary.trainable_params,
                             total_params=summary.total_params, wall_time_s=summary.wall_time_s,
                             steps=summary.steps, run_dir=summary.run_dir).dump()


def register_artifact(registry_root: str | Path, name: str, model_dir: str | Path,
                      metadata: ArtifactMetadata | dict[str, Any], promote: bool = False) -> str:
    """Register `model_dir` (atomically) under `name`; returns its ref, "name@version".

    Metadata naming a `base_model` but no `base_fingerprint` gets it here, so every artifact records
    the base it was trained on (serving checks it; see `artifact_metadata`)."""
    raw = metadata.dump() if isinstance(metadata, ArtifactMetadata) else metadata
    meta = ArtifactMetadata.read(raw)
    if meta.base_model and not meta.base_fingerprint:
        raw = {**raw, **ArtifactMetadata(base_fingerprint=base_fingerprint(meta.base_model)).dump()}
    return Registry(registry_root).register(name, model_dir, raw, promote=promote).ref

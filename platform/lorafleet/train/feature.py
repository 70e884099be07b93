"""The feature-based baseline: frozen-model features + logistic regression, run as one Ray task.

It trains no torch weights, so it skips Ray Train; its artifact (`feature.safetensors` +
`feature.json`) is registered like any other.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray

from lorafleet.base_model import load_model, load_tokenizer
from lorafleet.config import FinetuneConfig
from lorafleet.data import prompt_ids
from lorafleet.evaluate import last_token_features, run_device
from lorafleet.tasks import get_task
from lorafleet.train.context import ARTIFACT_DIR, RunContext
from lorafleet.train.results import RunSummary, dir_bytes, register_artifact, run_metadata

__all__ = ["feature_baseline"]


def _fit_features(cfg_json: dict, train_rows: list[dict], test_rows: list[dict], labels: list[str]):
    """The feature baseline's Ray task: frozen-model features + logistic regression, then scored."""
    import resource

    import numpy as np
    from safetensors.numpy import save
    from sklearn.linear_model import LogisticRegression

    c = FinetuneConfig.model_validate(cfg_json)
    task = get_task(c.task)  # configured: the run's labels and instruction line in the prompt
    tok = load_tokenizer(c.model.name_or_path)
    model = load_model(c.model.name_or_path, c.model.dtype).to(run_device(c.scaling.use_gpu))  # the GPU it reserves

    featurized = {"tokens": 0, "seconds": 0.0}

    def feats(rows):
        ids = [prompt_ids(tok, task.instruction(r)) for r in rows]
        t0 = time.perf_counter()
        out = last_token_features(model, tok, ids).numpy()
        featurized["seconds"] += time.perf_counter() - t0
        featurized["tokens"] += sum(len(x) for x in ids)
        return out

    y = [labels.index(task.target(r).strip()) for r in train_rows]
    clf = LogisticRegression(max_iter=2000).fit(feats(train_rows), y)
    preds = [labels[i] for i in clf.predict(feats(test_rows))]
    measured = {  # the same measures as the Ray Train methods report
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "tokens_per_s": featurized["tokens"] / max(featurized["seconds"], 1e-9),
    }
    # The classifier is a few KiB: it travels back as bytes, since this task may run on
    # another node than the driver that writes the artifact.
    files = {
        "feature.safetensors": save(
            {"coef": clf.coef_.astype(np.float32), "intercept": clf.intercept_.astype(np.float32)}
        ),
        "feature.json": json.dumps({"labels": labels, "base_model": c.model.name_or_path}).encode(),
    }
    trainable = int(clf.coef_.size + clf.intercept_.size)
    total = trainable + sum(p.numel() for p in model.parameters())
    return task.score(preds, test_rows), trainable, total, files, measured


def feature_baseline(ctx: RunContext, registry_root: str | Path, started: float) -> RunSummary:
    """Frozen-model features + logistic regression, run as one Ray task on the cluster; registered."""
    cfg, place, labels = ctx.cfg, ctx.place, ctx.labels
    # max_calls=1: a fresh worker process, so its peak RSS is this run's alone.
    fit = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                     accelerator_type=cfg.scaling.accelerator_type, max_calls=1)(_fit_features)
    metrics, trainable, total, files, measured = ray.get(
        fit.remote(cfg.model_dump(mode="json"), ctx.rows("train"), ctx.rows("test"), labels)
    )
    run_dir = str(place.location)
    root = place.dir if place.dir is not None else Path(tempfile.mkdtemp(prefix="lorafleet-artifact-"))
    model_dir = root / ARTIFACT_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    for fname, blob in files.items():
        (model_dir / fname).write_bytes(blob)
    summary = RunSummary(run_name=place.name, run_dir=run_dir, method="feature", task=cfg.task.name,
                         test_metrics=metrics, trainable_params=trainable, total_params=total,
                         wall_time_s=round(time.time() - started, 2), steps=0, artifact_dir=str(model_dir),
                         peak_memory_mb=round(measured["peak_memory_mb"], 1),
                         tokens_per_s=round(measured["tokens_per_s"], 1), artifact_bytes=dir_bytes(model_dir))
    if cfg.register_artifact:
        summary.registered = register_artifact(registry_root, cfg.name, model_dir, run_metadata(cfg, summary, labels))
    return summary

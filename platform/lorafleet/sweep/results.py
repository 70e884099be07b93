"""What a finished sweep produced: the trials ranked by their best validation metric, the winner
scored on the test split and registered, and the files written into the sweep folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lorafleet.config import FinetuneConfig, registry_root
from lorafleet.report.sweep import plot
from lorafleet.sweep.spec import PLOT_FILE, RESULTS_FILE, TABLE_FILE, TRIALS_DIR, SweepSpec, trial_config
from lorafleet.sweep.tuner import read_events

__all__ = ["SweepReport", "summarize", "register_best", "write_outputs", "cfg_value"]


class SweepReport(BaseModel):
    """What a finished sweep produced (results.json is this, as JSON)."""

    sweep: str
    sweep_dir: str
    metric: str
    mode: str
    space: list[str]
    wall_time_s: float
    trials: list[dict[str, Any]]  # ranked, best first
    best: dict[str, Any] | None = None
    registered: str | None = None
    promoted: bool = False
    # Searched keys computed from another one (tied_to): not in results.json, only for the table.
    tied: list[str] = Field(default_factory=list, exclude=True)


def _history(result) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    if df is None or len(df) == 0:
        return []
    keep = [c for c in df.columns if c in ("step", "loss", "lr", "checkpoint_path", "time_total_s", "trainable_params")
            or c.startswith("val_")]
    rows = df[keep].to_dict("records")
    # A trial restarted by --resume reports again from its last checkpoint: keep one row per step.
    by_step = {int(r["step"]): {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def _train_loss(log: Path) -> list[list[float]]:
    """[[step, loss], ...] from a trial's train_log.jsonl (rank 0, every log_every steps), by step; [] if absent."""
    if not log.is_file():
        return []
    losses: dict[int, float] = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # a resumed trial logs some steps twice: keep the last
    return [[step, losses[step]] for step in sorted(losses)]


def cfg_value(cfg: FinetuneConfig, dotted: str) -> Any:
    """The value of a dotted key (`method.lora.r`) in a resolved training config."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _trial_row(spec: SweepSpec, result, asha_stopped: set[str], starts: dict[str, int]) -> dict[str, Any]:
    """One trial of results.json: its params, status, best kept evaluation, metric history and
    training-loss curve (what the table and the figure show)."""
    trial_id = Path(result.path).name
    params = {k: v for k, v in (result.config or {}).items() if k in spec.sweep.space}
    cfg = trial_config(spec, params, trial_id)
    history = _history(result)
    evals = [h for h in history if spec.metric in h]
    # The trial's best evaluation whose checkpoint Ray Train kept (it keeps the best K by score).
    kept = [h for h in evals if h.get("checkpoint_path") and Path(h["checkpoint_path"]).is_dir()]
    sign = 1 if spec.mode == "max" else -1
    best = max(kept or evals, key=lambda h: (sign * h[spec.metric], -h["step"]), default=None)
    last_step = int(history[-1]["step"]) if history else 0
    status = "error" if result.error else ("asha" if trial_id in asha_stopped else
             ("done" if last_step >= cfg.train.max_steps else "stopped"))
    return {
        "trial_id": trial_id,
        "status": status,  # done | asha (stopped early by ASHA) | stopped (time budget) | error
        "stopped_early": status in ("asha", "stopped"),
        "params": {k: cfg_value(cfg, k) for k in spec.sweep.space},
        "lora_r": cfg.method.lora.r,
        "lora_alpha": cfg.method.lora.alpha,
        "lr": cfg.train.lr,
        "best_" + spec.metric: best[spec.metric] if best else None,
        "best_step": int(best["step"]) if best else None,
        "best_checkpoint": best.get("checkpoint_path") if best else None,
        "trainable_params": int(history[-1].get("trainable_params", 0)) if history else 0,
        "steps": last_step,
        "max_steps": cfg.train.max_steps,
        "wall_time_s": round(float(history[-1].get("time_total_s", 0.0)), 1) if history else 0.0,
        "starts": starts.get(trial_id, 0),
        "error": str(result.error).splitlines()[0][:300] if result.error else None,
        "history": [{k: v for k, v in h.items() if k != "checkpoint_path"} for h in history],
        "train_loss": _train_loss(Path(spec.sweep_dir) / TRIALS_DIR / trial_id / "train_log.jsonl"),
    }


def summarize(spec: SweepSpec, grid, wall_time_s: float) -> SweepReport:
    """Rank the trials of a finished sweep by their best validation metric; one dict per trial."""
    sweep_dir = Path(spec.sweep_dir)
    events = read_events(sweep_dir)
    asha_stopped = {e["trial_id"] for e in events if e["event"] == "asha_stop"}
    starts: dict[str, int] = {}
    for e in events:
        if e["event"] == "start":
            starts[e["trial_id"]] = starts.get(e["trial_id"], 0) + 1
    trials = [_trial_row(spec, result, asha_stopped, starts) for result in grid]
    key = "best_" + spec.metric
    sign = 1 if spec.mode == "max" else -1

    def rank_key(t: dict[str, Any]):
        # Best value first; a tie goes to the trial that reached it in fewer steps, then to trial id.
        value = t[key]
        return (value is None, -sign * value if value is not None else 0.0, t["best_step"] or 0, t["trial_id"])

    trials.sort(key=rank_key)
    for i, t in enumerate(trials, start=1):
        t["rank"] = i
    return SweepReport(sweep=spec.sweep.name, sweep_dir=str(sweep_dir), metric=spec.metric, mode=spec.mode,
                       space=list(spec.sweep.space), wall_time_s=round(wall_time_s, 1), trials=trials,
                       tied=[k for k, p in spec.sweep.space.items() if p.tied_to is not None])


def register_best(spec: SweepSpec, report: SweepReport, promote: bool = False) -> SweepReport:
    """Score the winner's best checkpoint on the test split and register it (sweep name in metadata).

    The test metric is computed exactly as `lorafleet eval` computes it (`lorafleet.train.results`: same split
    reader, same loader and dtype), so re-evaluating the registered version gives the same number.
    """
    from lorafleet.cluster import on_run_accelerator
    from lorafleet.registry import SweepOrigin
    from lorafleet.train.checkpoint import MODEL_DIR
    from lorafleet.train.context import read_rows, task_labels
    from lorafleet.train.results import artifact_metadata, checkpoint_artifact, register_artifact, score_model_dir

    previous = Path(spec.sweep_dir) / RESULTS_FILE
    if previous.is_file() and json.loads(previous.read_text()).get("registered"):
        # This sweep already finished and registered its winner (--resume of a finished sweep).
        old = SweepReport.model_validate_json(previous.read_text())
        return report.model_copy(update={"best": old.best, "registered": old.registered, "promoted": old.promoted})
    winner = next((t for t in report.trials if t["best_checkpoint"] and t["status"] != "error"), None)
    if winner is None:
        return report
    cfg = trial_config(spec, {k: v for k, v in winner["params"].items() if not spec.sweep.space[k].tied_to},
                       winner["trial_id"])
    _, labels = task_labels(cfg)
    model_dir = Path(winner["best_checkpoint"]) / MODEL_DIR
    if not model_dir.is_dir():  # a sharded (FSDP2) trial: its artifact is exported from the shards, once
        model_dir = checkpoint_artifact(model_dir.parent, cfg, Path(spec.sweep_dir) / "winner-artifact")
    # Where the run's model lives: a GPU sweep's winner is scored in a Ray task holding a GPU.
    score = on_run_accelerator(score_model_dir, use_gpu=cfg.scaling.use_gpu, cpus=cfg.scaling.cpus_per_worker)
    test_metrics = score(model_dir, cfg, read_rows(cfg, "test"), labels)
    best = {"trial_id": winner["trial_id"], "params": winner["params"], spec.metric: winner["best_" + spec.metric],
            "step": winner["best_step"], "checkpoint": winner["best_checkpoint"], "test_metrics": test_metrics}
    report = report.model_copy(update={"best": best})
    if not spec.sweep.registry.enabled:
        return report
    # A trial reports no total_params, so the winner's metadata has none (the field is optional).
    metadata = artifact_metadata(
        cfg, labels, test_metrics=test_metrics, trainable_params=winner["trainable_params"],
        wall_time_s=winner["wall_time_s"], steps=winner["best_step"],
        run_dir=str(Path(cfg.run.storage_path) / winner["trial_id"]),
    ).model_copy(update={"sweep": SweepOrigin(
        name=spec.sweep.name, dir=spec.sweep_dir, trial_id=winner["trial_id"], metric=spec.metric,
        value=winner["best_" + spec.metric], params=winner["params"], trials=len(report.trials))})
    ref = register_artifact(registry_root(spec.home), spec.sweep.registry.name or cfg.name, model_dir, metadata,
                            promote=promote)
    return report.model_copy(update={"registered": ref, "promoted": promote})


def write_outputs(report: SweepReport, table_text: str) -> None:
    """results.json, table.txt and sweep.png in the sweep folder."""
    sweep_dir = Path(report.sweep_dir)
    (sweep_dir / RESULTS_FILE).write_text(report.model_dump_json(indent=2))
    (sweep_dir / TABLE_FILE).write_text(table_text)
    plot(report, sweep_dir / PLOT_FILE)

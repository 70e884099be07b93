"""What the slow tests' tracked runs logged to the session's `mlflow_server`, checked through MLflow's client:
called from tests/test_compare.py (a ladder) and tests/test_sweep.py (a sweep), which run them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

__all__ = ["check_ladder_tracked", "check_sweep_tracked"]


def _history(client, run_id: str, key: str) -> dict[int, float]:
    """A metric's curve, {step: value}; a step logged twice (a trial resumed from a checkpoint) keeps the last."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _artifacts(client, run_id: str) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id)}


def check_ladder_tracked(client, out: Path, rows: list[dict], tb_dir: Path) -> None:
    """The ladder in `out` (rungs zero_shot, a failing partial, lora; 60 steps, log_every 20) as MLflow and
    TensorBoard hold it: a parent run, a child per rung with what ladder.json says it measured."""
    from helpers import mlflow_children

    (parent,) = client.search_runs([client.get_experiment_by_name("ladders").experiment_id],
                                   filter_string=f"tags.`lorafleet.ladder_dir` = '{out}'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == out.name
    assert parent.data.params["rungs"] == '["zero_shot", "partial", "lora"]'
    assert parent.data.tags["lorafleet.failed_rungs"] == "partial"
    assert {"ladder.png", "ladder.json", "report.md", "compare-config.yaml"} <= _artifacts(client, parent.info.run_id)
    by = {r["rung"]: r for r in rows}
    for rung in ("zero_shot", "lora"):
        assert parent.data.metrics[f"{rung}_accuracy"] == by[rung]["value"]
    children = mlflow_children(client, parent.info.run_id)
    lora_name = Path(by["lora"]["run_dir"]).name
    zero = children[f"{out.name}-zero_shot"]
    assert zero.info.status == "FINISHED" and zero.data.metrics["test_accuracy"] == by["zero_shot"]["value"]
    assert zero.data.metrics["rank"] == by["zero_shot"]["rank"] and zero.data.params["task.name"] == "classification"
    failed = [c for name, c in children.items() if "partial" in name]
    assert [c.info.status for c in failed] == ["FAILED"]  # it started, then raised in the workers
    lora = children[lora_name]
    assert lora.info.run_id == by["lora"]["tracking_run_id"] and lora.info.status == "FINISHED"
    assert lora.data.params["method.name"] == "lora" and lora.data.params["train.max_steps"] == "60"
    assert lora.data.params["tracking.mlflow.experiment"] == "ladders"  # the resolved config, all of it
    m = lora.data.metrics
    assert m["test_accuracy"] == by["lora"]["value"] and m["trainable_params"] == by["lora"]["trainable_params"]
    assert m["wall_time_s"] == by["lora"]["wall_time_s"] and m["rank"] == by["lora"]["rank"]
    assert m["cost"] == pytest.approx(by["lora"]["cost"])
    log = [json.loads(x) for x in (Path(by["lora"]["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "tokens_per_s"):  # rank 0's step records, as train_log.jsonl has them
        assert _history(client, lora.info.run_id, key) == {r["step"]: pytest.approx(r[key]) for r in log}, key
    assert list(_history(client, lora.info.run_id, "val_accuracy")) == [60]
    assert {"summary.json", "lorafleet-config.yaml"} <= _artifacts(client, lora.info.run_id)
    # TensorBoard: the same curves, one folder per rung under the ladder's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir / out.name / lora_name))
    events.Reload()
    assert [s.step for s in events.Scalars("loss")] == [r["step"] for r in log] == [20, 40, 60]


def check_sweep_tracked(client, sweep_dir: Path, results: dict) -> None:
    """The sweep in `sweep_dir` (killed and resumed) as MLflow holds it: ONE parent run (the resume
    continued it), one child per trial with its resolved config, curves and outcome, the winner's
    test metrics and registry reference."""

    from helpers import mlflow_children

    (parent,) = client.search_runs([client.get_experiment_by_name("lorafleet").experiment_id],
                                   filter_string=f"tags.`lorafleet.sweep_dir` = '{sweep_dir}'")
    assert parent.info.status == "FINISHED" and parent.data.tags["lorafleet.registered"] == results["registered"]
    assert parent.data.params["search.algorithm"] == "grid"
    best = results["best"]
    assert parent.data.metrics["test_accuracy"] == best["test_metrics"]["accuracy"]
    assert parent.data.metrics["best_val_accuracy"] == best["val_accuracy"]
    assert {"sweep.png", "results.json", "table.txt", "sweep.json"} <= _artifacts(client, parent.info.run_id)
    children = mlflow_children(client, parent.info.run_id)
    trials = {t["trial_id"]: t for t in results["trials"]}
    assert set(children) == set(trials)  # no trial twice, though two were running when the driver died
    for trial_id, t in trials.items():
        run = children[trial_id]
        assert run.info.status == "FINISHED", (trial_id, run.info.status)
        assert run.data.tags["lorafleet.status"] == t["status"] and run.data.metrics["rank"] == t["rank"]
        for key, value in t["params"].items():  # the sampled values, inside the trial's whole resolved config
            assert json.loads(run.data.params[key]) == pytest.approx(value), key
        assert run.data.params["train.max_steps"] == "120"
        evals = _history(client, run.info.run_id, "val_accuracy")
        assert evals == {h["step"]: pytest.approx(h["val_accuracy"]) for h in t["history"]}, trial_id
        log = [json.loads(x) for x in (sweep_dir / "trials" / trial_id / "train_log.jsonl").read_text().splitlines()]
        # Every record up to the trial's last result, and none the worker did not write. A trial ASHA stops
        # goes on for a few steps until the stop reaches its worker (under load, train_log.jsonl at 120 for a
        # trial stopped at 90): what it wrote before the trial's end was logged, what it wrote after was not.
        logged, written = set(_history(client, run.info.run_id, "loss")), {r["step"] for r in log}
        assert {s for s in written if s <= t["steps"]} <= logged <= written, (trial_id, sorted(logged), sorted(written))
    winner = children[best["trial_id"]]
    assert winner.data.tags["lorafleet.registered"] == results["registered"]
    assert winner.data.metrics["test_accuracy"] == best["test_metrics"]["accuracy"]

"""Experiment tracking (`lorafleet.tracking`, the `tracking:` block): fast checks of the config, the
params flattening, the step curves, and a tracked run's round trip through MLflow's own client on a
local sqlite store and through TensorBoard's event reader.

What a real `mlflow server` receives from a training run, a sweep and a ladder is checked inside the
slow tests that already run them (their drivers log to the session's `mlflow_server`):
tests/test_sweep.py (4 trials, killed and resumed, via MLFLOW_TRACKING_URI) and tests/test_compare.py
(a 3-rung ladder: a prompt rung, a failing rung and a LoRA training run, via the config block), with
the checks in tests/tracking_checks.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lorafleet.config import ConfigError, parse_config
from lorafleet.config.compare import parse_compare_config
from lorafleet.config.tracking import MLFLOW_EXPERIMENT_ENV, MLFLOW_URI_ENV, MlflowSettings, TrackingConfig
from lorafleet.tracking import TrackingError, flatten_params, start_run, step_metrics


def test_flatten_params_dotted_json_values_and_mlflow_limits() -> None:
    flat = flatten_params({"train": {"lr": 0.002, "schedule": "cosine"}, "method": {"lora": {"target_modules": ["q_proj", "v_proj"]}},
                           "task": {"labels": None}, "register_artifact": True, "data": {"fields": {}},
                           "tags": {"a+b": "x"}, "long": "x" * 7000})
    assert flat["train.lr"] == "0.002" and flat["train.schedule"] == "cosine"
    assert flat["method.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert flat["task.labels"] == "null" and flat["register_artifact"] == "true" and flat["data.fields"] == "{}"
    assert flat["tags.a_b"] == "x"  # MLflow refuses '+' in a key
    assert len(flat["long"]) == 6000  # MLflow's longest param value


def test_step_metrics_keeps_only_curves() -> None:
    record = {"step": 20, "time": 1.7e9, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 900.0, "val_accuracy": 0.75,
              "trainable_params": 10, "total_params": 100, "resumed_from": None, "worker_nodes": ["n"],
              "epoch": 0, "peak_memory_mb": 300.0, "broken": math.nan, "flag": True}
    assert step_metrics(record) == {"loss": 0.5, "lr": 1e-3, "tokens_per_s": 900.0, "val_accuracy": 0.75,
                                    "epoch": 0.0, "peak_memory_mb": 300.0}


def test_tracking_block_defaults_off_env_turns_mlflow_on(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MLFLOW_URI_ENV, raising=False)
    monkeypatch.delenv(MLFLOW_EXPERIMENT_ENV, raising=False)
    cfg = parse_config({}, home=tmp_path)
    assert cfg.tracking.mlflow.uri() is None and cfg.tracking.tensorboard.dir is None
    assert cfg.tracking.mlflow.experiment_name() == "lorafleet"
    monkeypatch.setenv(MLFLOW_EXPERIMENT_ENV, "team-exp")
    assert cfg.tracking.mlflow.experiment_name() == "team-exp"
    assert MlflowSettings(experiment="mine").experiment_name() == "mine"
    assert not start_run(cfg.tracking, "r").enabled  # off: nothing to reach, nothing imported
    monkeypatch.setenv(MLFLOW_URI_ENV, "http://team-mlflow:5000")
    assert cfg.tracking.mlflow.uri() == "http://team-mlflow:5000"
    assert MlflowSettings(tracking_uri="http://other:5000").uri() == "http://other:5000"  # the config wins
    assert MlflowSettings(enabled=False).uri() is None  # off even with the variable set
    monkeypatch.delenv(MLFLOW_URI_ENV)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        start_run(TrackingConfig(mlflow={"enabled": True}), "r")
    cfg = parse_config({"tracking": {"tensorboard": {"dir": "${home}/tb"}}}, home=tmp_path)
    assert cfg.tracking.tensorboard.dir == str(tmp_path / "tb")
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.uri: unknown key"):
        parse_config({"tracking": {"mlflow": {"uri": "http://x"}}}, home=tmp_path)


def test_sweeps_and_ladders_take_the_training_configs_block(tmp_path: Path) -> None:
    from lorafleet.sweep import load_sweep
    from lorafleet.sweep.tracking import sweep_tracking

    sweep_yaml = Path(__file__).parents[1] / "configs" / "tiny" / "sweep-classification.yaml"
    spec = load_sweep(sweep_yaml, ["overrides.tracking.mlflow.experiment=tickets"], home=tmp_path)
    assert sweep_tracking(spec).mlflow.experiment == "tickets"
    ladder = parse_compare_config({"base": {"tracking": {"mlflow": {"tracking_uri": "http://m:5000"}}},
                                   "rungs": ["zero_shot", "lora"]}, home=tmp_path)
    assert {c.tracking.mlflow.tracking_uri for c in ladder.rungs.values()} == {"http://m:5000"}


def test_a_tracked_run_round_trips_through_mlflow_and_tensorboard(tmp_path: Path) -> None:
    """A run and its child, logged as a training run logs (params, step records, results, files),
    read back through MlflowClient (sqlite store, no server) and TensorBoard's event reader."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorafleet.train.recipe import _track_summary
    from lorafleet.train.results import RunSummary

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("unit", artifact_location=str(tmp_path / "artifacts"))
    settings = TrackingConfig(mlflow={"tracking_uri": uri, "experiment": "unit", "tags": {"team": "nlp"}},
                              tensorboard={"dir": str(tmp_path / "tb")})
    parent = start_run(settings, "ladder-x", tags={"lorafleet.kind": "ladder"})
    run = start_run(settings, "run-1", parent=parent, config={"train": {"lr": 0.002}, "method": {"name": "lora"}})
    run.log_steps([{"step": 10, "time": 1000.0, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 50.0},
                   {"step": 20, "time": 1001.0, "loss": 1.5, "lr": 5e-4, "tokens_per_s": 60.0, "val_accuracy": 0.5}])
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    summary = RunSummary(run_name="run-1", run_dir=str(run_dir), method="lora", task="classification",
                         test_metrics={"accuracy": 0.75}, trainable_params=123, total_params=4567, wall_time_s=9.5,
                         steps=20, registered="tickets@3")
    _track_summary(run, summary)
    failed = start_run(settings, "run-2", parent=parent)
    failed.finish(ok=False)
    parent.finish()

    client = MlflowClient(uri)
    got = client.get_run(summary.tracking_run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run-1"
    assert got.data.params == {"train.lr": "0.002", "method.name": "lora"}
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id and got.data.tags["team"] == "nlp"
    assert got.data.tags["lorafleet.registered"] == "tickets@3"
    assert got.data.metrics["test_accuracy"] == 0.75 and got.data.metrics["trainable_params"] == 123
    assert got.data.metrics["wall_time_s"] == 9.5
    loss = client.get_metric_history(got.info.run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in loss] == [(10, 2.0, 1_000_000), (20, 1.5, 1_001_000)]
    assert [(m.step, m.value) for m in client.get_metric_history(got.info.run_id, "val_accuracy")] == [(20, 0.5)]
    assert [f.path for f in client.list_artifacts(got.info.run_id)] == ["summary.json"]  # the config file is absent
    assert client.get_run(failed.run_id).info.status == "FAILED"

    events = EventAccumulator(str(tmp_path / "tb" / "ladder-x" / "run-1"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(10, 2.0), (20, 1.5)]
    assert [(s.step, s.value) for s in events.Scalars("test_accuracy")] == [(20, 0.75)]

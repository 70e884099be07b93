"""A sweep in MLflow / TensorBoard (the training config's `tracking:` block): one parent run for the
sweep, one child run per trial, all logged from the driver.

Tune calls `TrialTracking` (a Tune callback, on the driver) when a trial starts, reports an
evaluation and ends: it opens the trial's child run (its resolved config as params) and logs the
trial's new step records from its train_log.jsonl (rank 0's loss, lr, tokens/s, val_* every
log_every steps), so curves appear while the sweep runs. When the sweep is done, `finish_sweep` adds
each trial's outcome (best metric, rank, ASHA), the winner's test metrics and registry reference, and
the sweep's table, figure and results.json. The run ids live in the sweep folder (`tracking.json`),
so `--resume` continues the same runs.

Why not Ray's `MLflowLoggerCallback`: it logs only what reaches Tune (a trial's evaluations, at Tune's
iteration count, not the training step) and the sampled keys rather than the resolved config; the
per-step curves reach the driver only through train_log.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafleet.config import TrackingConfig
from lorafleet.sweep.spec import PLOT_FILE, RESULTS_FILE, SPEC_FILE, TABLE_FILE, TRIALS_DIR, SweepSpec, example_params, trial_config
from lorafleet.tracking import Tracker, attach_run, start_run

__all__ = ["TRACKING_FILE", "sweep_tracking", "start_sweep", "trial_tracking", "finish_sweep"]

# {"parent": run id, "tb_dir": ..., "trials": {trial_id: run id}, "lines": {trial_id: train_log lines logged}}
TRACKING_FILE = "tracking.json"


def sweep_tracking(spec: SweepSpec) -> TrackingConfig:
    """The sweep's tracking settings: its training config's `tracking:` block (with the sweep's overrides)."""
    return trial_config(spec, example_params(spec)).tracking


def _state(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(sweep_dir: str | Path, state: dict[str, Any]) -> None:
    path = Path(sweep_dir) / TRACKING_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _known_trials(settings: TrackingConfig, state: dict[str, Any]) -> dict[str, str | None]:
    """Trial id -> its run id: tracking.json's, and MLflow's own record (the children of the parent run).

    MLflow is asked too because Tune may write back an older tracking.json over the sweep folder after
    --resume (it syncs its experiment folder from the copy it restored), losing runs opened since."""
    trials = dict(state.get("trials", {}))
    uri, parent = settings.mlflow.uri(), state.get("parent")
    if uri and parent:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_run(parent).info.experiment_id
        for run in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000):
            trial_id = run.data.tags.get("lorafleet.trial_id")
            if trial_id:
                trials.setdefault(trial_id, run.info.run_id)
    return trials


def start_sweep(spec: SweepSpec) -> Tracker:
    """The sweep's parent run: opened (params: the sweep config) on a new sweep, found again on --resume."""
    settings = sweep_tracking(spec)
    name = Path(spec.sweep_dir).name
    state = _state(spec.sweep_dir)
    if state.get("parent") or state.get("tb_dir"):
        return attach_run(settings, name, state.get("parent"), state.get("tb_dir"), write=False)
    tracker = start_run(settings, name, config=spec.sweep.model_dump(mode="json"),
                        tags={"lorafleet.kind": "sweep", "lorafleet.sweep_dir": spec.sweep_dir,
                              "lorafleet.metric": spec.metric})
    if tracker.enabled:
        _save_state(spec.sweep_dir, {"parent": tracker.run_id, "tb_dir": str(tracker.tb_dir or "") or None, "trials": {}})
    return tracker


def trial_tracking(spec: SweepSpec):
    """The Tune callback that logs each trial as a child of the sweep's run (None when tracking is off)."""
    from ray.tune import Callback

    settings = sweep_tracking(spec)
    if not settings.mlflow.uri() and not settings.tensorboard.dir:
        return None
    spec_json = spec.model_dump(mode="json")

    class TrialTracking(Callback):
        """Driver side: a child run per trial, fed from the trial's train_log.jsonl. Open trackers are
        not pickled with the Tuner (Tune saves its callbacks); the run ids are in tracking.json."""

        def __init__(self):
            self._open: dict[str, Tracker] = {}

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.__init__()

        def _tracker(self, trial_id: str, config: dict[str, Any]) -> Tracker:
            if trial_id in self._open:
                return self._open[trial_id]
            s = SweepSpec.model_validate(spec_json)
            settings, state = sweep_tracking(s), _state(s.sweep_dir)
            tb_dir = Path(state["tb_dir"]) / trial_id if state.get("tb_dir") else None
            known = _known_trials(settings, state)
            if trial_id in known:  # restarted by --resume: the same run
                tracker = attach_run(settings, trial_id, known[trial_id], tb_dir)
            else:
                parent = attach_run(settings, Path(s.sweep_dir).name, state.get("parent"), state.get("tb_dir"), write=False)
                params = {k: v for k, v in config.items() if k in s.sweep.space}
                tracker = parent.child(trial_id, config=trial_config(s, params, trial_id).model_dump(mode="json"),
                                       tags={"lorafleet.kind": "trial", "lorafleet.trial_id": trial_id})
                state.setdefault("trials", {})[trial_id] = tracker.run_id
                _save_state(s.sweep_dir, state)
            self._open[trial_id] = tracker
            return tracker

        def _tail(self, trial) -> Tracker:
            tracker = self._tracker(trial.trial_id, trial.config or {})
            log = Path(spec_json["sweep_dir"]) / TRIALS_DIR / trial.trial_id / "train_log.jsonl"
            text = log.read_text() if log.is_file() else ""
            lines = text.splitlines()
            state = _state(spec_json["sweep_dir"])  # lines already logged: kept there, so --resume goes on
            done = state.setdefault("lines", {}).get(trial.trial_id, 0)
            complete = lines[done:] if text.endswith("\n") else lines[done:-1]  # a line being written waits
            if complete:
                tracker.log_steps(json.loads(line) for line in complete if line.strip())
                state["lines"][trial.trial_id] = done + len(complete)
                _save_state(spec_json["sweep_dir"], state)
            return tracker

        def on_trial_start(self, iteration, trials, trial, **info):
            self._tracker(trial.trial_id, trial.config or {})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._tail(trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._tail(trial).finish(ok=True)
            self._open.pop(trial.trial_id, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tail(trial).finish(ok=False)
            self._open.pop(trial.trial_id, None)

    return TrialTracking()


def finish_sweep(spec: SweepSpec, tracker: Tracker, report: Any, ok: bool = True) -> None:
    """A finished sweep's results: each trial's outcome on its run, the winner's test metrics and
    registry reference on the parent and the winner's run, the table, figure and results.json."""
    if not tracker.enabled:
        return
    settings = sweep_tracking(spec)
    known = _known_trials(settings, _state(spec.sweep_dir))
    key = "best_" + report.metric
    for t in report.trials:
        run_id = known.get(t["trial_id"])
        if run_id is None:
            continue
        trial = attach_run(settings, t["trial_id"], run_id)
        outcome = {key: t[key], "rank": t["rank"], "trainable_params": t["trainable_params"],
                   "wall_time_s": t["wall_time_s"], "best_step": t["best_step"]}
        if report.best and report.best["trial_id"] == t["trial_id"]:
            outcome |= {f"test_{k}": v for k, v in report.best["test_metrics"].items()}
            trial.set_tags({"lorafleet.registered": report.registered, "lorafleet.winner": "true"})
        trial.log_metrics({k: v for k, v in outcome.items() if v is not None}, step=t["steps"])
        trial.set_tags({"lorafleet.status": t["status"], "lorafleet.stopped_early": t["stopped_early"]})
    results: dict[str, float] = {"wall_time_s": report.wall_time_s, "trials": len(report.trials)}
    if report.best:
        results |= {key: report.best[report.metric], **{f"test_{k}": v for k, v in report.best["test_metrics"].items()}}
    tracker.log_metrics(results)
    tracker.set_tags({"lorafleet.registered": report.registered,
                      "lorafleet.winner": report.best["trial_id"] if report.best else None})
    sweep_dir = Path(spec.sweep_dir)
    tracker.log_files([sweep_dir / PLOT_FILE, sweep_dir / RESULTS_FILE, sweep_dir / TABLE_FILE, sweep_dir / SPEC_FILE])
    tracker.finish(ok)

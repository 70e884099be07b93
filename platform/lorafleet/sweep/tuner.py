"""Building the Tune experiment of a sweep (search algorithm, ASHA, the event log) and restoring an
interrupted one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lorafleet.config import FinetuneConfig
from lorafleet.sweep.spec import EVENTS_FILE, SPEC_FILE, SweepSpec, example_params, read_spec, trial_config
from lorafleet.sweep.tracking import trial_tracking
from lorafleet.sweep.trainable import trainable

__all__ = ["build_tuner", "restore_tuner", "read_events"]


def read_events(sweep_dir: Path) -> list[dict[str, Any]]:
    """events.jsonl: trial starts/completions/errors and ASHA's judgements, in order."""
    path = sweep_dir / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _event_logger(sweep_dir: str):
    """A Tune callback appending trial starts/completions/errors to events.jsonl (driver side)."""
    from ray.tune import Callback

    class EventLog(Callback):
        def _write(self, event: str, trial) -> None:
            with open(Path(sweep_dir) / EVENTS_FILE, "a") as f:
                f.write(json.dumps({"time": time.time(), "event": event, "trial_id": trial.trial_id}) + "\n")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._write("start", trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write("complete", trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write("error", trial)

    return EventLog()


def _asha(spec: SweepSpec, cfg: FinetuneConfig):
    """ASHA on the validation metric, in training steps; it also logs whom it stopped, and when."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    events = str(Path(spec.sweep_dir) / EVENTS_FILE)

    class RecordingASHA(ASHAScheduler):
        """ASHA that logs what it judged. Tune does not save a scheduler's state in its experiment
        checkpoint, so after --resume the rungs would start empty (and a weak restarted trial could
        not be stopped); unpickling (Tuner.restore) replays the logged results into the rungs."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if self._metric in result and "step" in result:
                record = {"time": time.time(), "event": "asha_result", "trial_id": trial.trial_id,
                          "step": result["step"], "value": result[self._metric]}
                if decision == TrialScheduler.STOP and result["step"] < cfg.train.max_steps:
                    record["event"] = "asha_stop"
                with open(events, "a") as f:
                    f.write(json.dumps(record) + "\n")
            return decision

        def __setstate__(self, state):
            self.__dict__.update(state)
            self._replay_pending = True
            if self._metric_op is not None:  # else Tune sets metric/mode later: replay then
                self._replay()

        def set_search_properties(self, metric, mode, **spec):
            ok = super().set_search_properties(metric, mode, **spec)
            if getattr(self, "_replay_pending", False) and self._metric_op is not None:
                self._replay()
            return ok

        def _replay(self):
            self._replay_pending = False
            if not Path(events).is_file() or not self._brackets:
                return
            for e in read_events(Path(events).parent):
                if e["event"] in ("asha_result", "asha_stop"):
                    trial = type("LoggedTrial", (), {"trial_id": e["trial_id"]})()
                    self._brackets[0].on_result(trial, e["step"], self._metric_op * e["value"])

    s = spec.sweep.scheduler
    return RecordingASHA(
        time_attr="step",
        max_t=cfg.train.max_steps,
        grace_period=s.grace_period or 2 * cfg.train.eval_every,
        reduction_factor=s.reduction_factor,
    )


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    grid = spec.sweep.search.algorithm == "grid"
    for key, p in spec.sweep.space.items():
        kind = p.kind()
        if kind == "tied_to":
            continue  # computed from its partner inside the trial (optuna cannot sample functions)
        if kind == "grid" or (kind == "choice" and grid):
            space[key] = tune.grid_search(list(getattr(p, kind)))
        elif kind == "choice":
            space[key] = tune.choice(list(p.choice))
        elif kind == "loguniform":
            space[key] = tune.loguniform(*p.loguniform)
        elif kind == "uniform":
            space[key] = tune.uniform(*p.uniform)
        elif kind == "randint":
            space[key] = tune.randint(*p.randint)
    return space


def _search_alg(spec: SweepSpec):
    s = spec.sweep.search
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=s.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A user-made BasicVariantGenerator ignores TuneConfig.max_concurrent_trials (all trials
    # started at once): it must get the cap itself.
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials)


def build_tuner(spec: SweepSpec):
    """A fresh Tuner for `spec`; writes sweep.json first so an interrupted sweep can be resumed."""
    from ray import tune

    sweep_dir = Path(spec.sweep_dir)
    if sweep_dir.exists():
        raise FileExistsError(f"sweep folder {sweep_dir} exists; resume it with `lorafleet sweep --resume {sweep_dir}`")
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    cfg = trial_config(spec, example_params(spec))
    s = spec.sweep.search
    return tune.Tuner(
        trainable(spec),
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_search_alg(spec),
            scheduler=_asha(spec, cfg) if spec.sweep.scheduler.name == "asha" else None,
            num_samples=spec.sweep.num_samples(),
            max_concurrent_trials=s.max_concurrent_trials,
            time_budget_s=s.time_budget_s,
            trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            # trial_tracking: each trial as an MLflow/TensorBoard child run of the sweep's (None when off).
            callbacks=[c for c in (_event_logger(str(sweep_dir)), trial_tracking(spec)) if c is not None],
            verbose=1,
        ),
    )


def restore_tuner(sweep_dir: str | Path):
    """The Tuner of an interrupted sweep: finished trials stay finished, unfinished ones continue."""
    from ray import tune

    sweep_dir = Path(sweep_dir).resolve()
    spec = read_spec(sweep_dir)
    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise FileNotFoundError(f"{sweep_dir} has no Tune experiment state to resume (did the sweep start?)")
    tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable(spec), resume_unfinished=True, resume_errored=True)
    return spec, tuner

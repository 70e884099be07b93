"""Hyperparameter sweeps on Ray Tune: search space, the trial trainable, results, registering the best.

A sweep config names a training config and a search space over its dotted keys. Each Tune trial
resolves one training config and runs the same `TorchTrainer` a plain `lorafleet train` runs,
inside a Tune *function trainable* (Ray 2.60's current pattern; `Tuner(trainer)` is deprecated).
Rank 0's validation reports reach Tune through `TuneReportCallback`, so ASHA can stop a weak trial
at its next evaluation. At the end the trials are ranked by the task's validation metric, the
winner's best checkpoint is scored on the test split and registered. Layout of a sweep folder::

    <home>/sweeps/<sweep-name>/
        sweep.json              the resolved sweep (sweep config + the training config it starts from)
        events.jsonl            trial starts/completions/errors and ASHA stops, as they happen
        <trial_id>/             Tune's trial folder: params.json, result.json, progress.csv
        trials/<trial_id>/      lorafleet-config.yaml (resolved), train_log.jsonl, checkpoint_*/
        results.json            every trial, ranked, plus the winner (machine-readable)
        table.txt, sweep.png    the table printed at the end and the learning-curve/scatter figure
        experiment_state-*.json, tuner.pkl, ...   Tune's own state (what --resume restores)
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorafleet.config import ConfigError, FinetuneConfig, apply_overrides, default_home, dump_config, parse_config
from lorafleet.finetune import init_ray
from lorafleet.report.sweep import plot, print_table

__all__ = [
    "ParamSpec",
    "SweepConfig",
    "SweepSpec",
    "SweepReport",
    "load_sweep",
    "build_tuner",
    "restore_tuner",
    "summarize",
    "register_best",
    "run_sweep",
    "resume_sweep",
    "print_table",
    "write_outputs",
    "read_spec",
    "trial_config",
    "run_trial",
    "SPEC_FILE",
    "RESULTS_FILE",
    "PLOT_FILE",
    "TABLE_FILE",
    "EVENTS_FILE",
]

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.json"
PLOT_FILE = "sweep.png"
TABLE_FILE = "table.txt"
EVENTS_FILE = "events.jsonl"
TRIALS_DIR = "trials"  # Ray Train's storage for the trials: trials/<trial_id>/checkpoint_*
_DISTRIBUTIONS = ("choice", "grid", "loguniform", "uniform", "randint", "tied_to")


# --- the sweep config ---------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Section):
    """One dimension of the search space; exactly one of the distribution keys is set."""

    choice: list[Any] | None = Field(None, description="Sample one of these values.")
    grid: list[Any] | None = Field(None, description="Try every value (a grid axis).")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], sampled on a log scale.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high].")
    randint: tuple[int, int] | None = Field(None, description="[low, high) integers.")
    tied_to: str | None = Field(None, description="Another dotted key: value = ratio * that key's value.")
    ratio: float | None = Field(None, description="With tied_to, e.g. lora alpha = 2 * r.")

    def problems(self) -> list[str]:
        """What is wrong with this dimension (checked by SweepConfig, so all keys report at once)."""
        chosen = [k for k in _DISTRIBUTIONS if getattr(self, k) is not None]
        if len(chosen) != 1:
            return [f"give exactly one of {', '.join(_DISTRIBUTIONS)} (got {chosen or 'none'}); "
                    "e.g. {choice: [4, 8, 16]} or {loguniform: [1.0e-4, 1.0e-2]}"]
        out = []
        if (self.tied_to is None) != (self.ratio is None):
            out.append("tied_to and ratio go together, e.g. {tied_to: method.lora.r, ratio: 2}")
        for name in ("loguniform", "uniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                out.append(f"{name} needs low < high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            out.append(f"loguniform needs low > 0 (got {self.loguniform[0]})")
        for name in ("choice", "grid"):
            values = getattr(self, name)
            if values is not None and not values:
                out.append(f"{name} needs at least one value")
        return out

    def kind(self) -> str:
        return next(k for k in _DISTRIBUTIONS if getattr(self, k) is not None)

    def example(self) -> Any:
        """A value this dimension can take (used to validate the key against the training config)."""
        kind = self.kind()
        if kind in ("choice", "grid"):
            return getattr(self, kind)[0]
        if kind == "randint":
            return int(self.randint[0])
        return float(getattr(self, kind)[0]) if kind != "tied_to" else None


class SearchSettings(_Section):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: Tune's variant generator; grid: every combination; optuna: TPE."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Trials to sample (random/optuna, default 8); grid: repeats of the grid (default 1)."
    )
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop every trial after this many seconds.")
    seed: int = Field(0, description="Seed of the sampler (random and optuna).")


class SchedulerSettings(_Section):
    name: Literal["asha", "fifo"] = Field("asha", description="asha: early stopping; fifo: run every trial to the end.")
    grace_period: int | None = Field(
        None, ge=1, description="Steps before ASHA may stop a trial (default: 2 x train.eval_every)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung.")


class ResourceSettings(_Section):
    """Resources of ONE trial: its Ray Train workers (the trial's own driver holds no CPU)."""

    num_workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (scaling.num_workers).")
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | None = None


class RegisterSettings(_Section):
    enabled: bool = Field(True, description="Register the best trial's adapter.")
    name: str | None = Field(None, description="Registry name; default: the training config's name.")


class SweepConfig(_Section):
    """A sweep: a training config, what to vary, how to search, where results go."""

    name: str = Field("sweep", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", description="Sweep name (folder prefix).")
    train_config: str = Field(description="The training config every trial starts from (relative to this file).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted training keys set in every trial.")
    space: dict[str, ParamSpec] = Field(description="Dotted training key -> distribution.")
    search: SearchSettings = Field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    registry: RegisterSettings = Field(default_factory=RegisterSettings)
    storage_path: str = Field("${home}/sweeps", description="Where sweep folders live (a local or shared folder).")

    @model_validator(mode="after")
    def _cross_checks(self) -> "SweepConfig":
        problems = []
        if not self.space:
            problems.append("space is empty: give at least one dimension, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
        for key, spec in self.space.items():
            own = spec.problems()
            problems += [f"space.{key}: {p}" for p in own]
            if own:
                continue
            if spec.tied_to is not None and spec.tied_to not in self.space and spec.tied_to not in self.overrides:
                problems.append(f"space.{key}: tied_to {spec.tied_to!r} is neither in space nor in overrides")
            if spec.tied_to is not None and self.space.get(spec.tied_to) is not None and self.space[spec.tied_to].tied_to:
                problems.append(f"space.{key}: tied_to {spec.tied_to!r}, which is itself tied; tie to a sampled key")
            if self.search.algorithm == "grid" and spec.kind() in ("loguniform", "uniform", "randint"):
                problems.append(
                    f"space.{key}: {spec.kind()} cannot be enumerated by algorithm 'grid'; "
                    "use {grid: [...]} / {choice: [...]}, or algorithm 'random' / 'optuna'"
                )
            if self.search.algorithm == "optuna" and spec.kind() == "grid":
                problems.append(f"space.{key}: optuna cannot take a grid axis; use {{choice: [...]}}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def num_samples(self) -> int:
        return self.search.num_samples or (1 if self.search.algorithm == "grid" else 8)


def _flatten(d: dict[str, Any], prefix: str = "", stop_at_specs: bool = False) -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; `--set overrides.train.lr=...` arrives nested."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        is_spec = stop_at_specs and isinstance(value, dict) and any(k in value for k in _DISTRIBUTIONS)
        if isinstance(value, dict) and value and not is_spec:
            out.update(_flatten(value, f"{full}.", stop_at_specs))
        else:
            out[full] = value
    return out


def _dotted(d: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


class SweepSpec(BaseModel):
    """Everything a trial (and --resume) needs: the validated sweep plus the raw training config."""

    model_config = ConfigDict(extra="forbid")
    sweep: SweepConfig
    train_raw: dict[str, Any]  # the training YAML as read, before overrides and sampling
    sweep_dir: str
    home: str
    metric: str  # e.g. "val_accuracy"
    mode: Literal["min", "max"]
    created: str

    def fixed_overrides(self) -> list[str]:
        res = self.sweep.resources
        scaling = {"scaling.num_workers": res.num_workers, "scaling.cpus_per_worker": res.cpus_per_worker,
                   "scaling.use_gpu": res.use_gpu}
        return _dotted(self.sweep.overrides) + _dotted({k: v for k, v in scaling.items() if v is not None})


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_id: str | None = None) -> FinetuneConfig:
    """The resolved training config of one trial: training YAML + overrides + sampled params (+ ties)."""
    raw = apply_overrides(spec.train_raw, spec.fixed_overrides())
    sampled = {k: v for k, v in params.items() if k in spec.sweep.space}
    raw = apply_overrides(raw, _dotted(sampled))
    flat = _flatten(raw)
    tied = {
        key: p.ratio * (sampled[p.tied_to] if p.tied_to in sampled else flat[p.tied_to])
        for key, p in spec.sweep.space.items() if p.tied_to is not None
    }
    raw = apply_overrides(raw, _dotted(tied))
    if trial_id is not None:  # each trial's Train run lives in the sweep folder, named after the trial
        raw = apply_overrides(raw, _dotted({"run.storage_path": str(Path(spec.sweep_dir) / TRIALS_DIR), "run.name": trial_id}))
    return parse_config(raw, f"trial {trial_id or '?'} of sweep {spec.sweep.name}", Path(spec.home))


def load_sweep(path: str | Path, overrides: list[str] | None = None, home: Path | None = None,
               name: str | None = None) -> SweepSpec:
    """Read and validate a sweep YAML and the training config it names; raise every problem at once.

    Args:
        path: the sweep YAML.
        overrides: dotted `key=value` overrides of the sweep YAML (`search.num_samples=4`,
            `overrides.train.max_steps=60`).
        home: the lorafleet home (default `$LORAFLEET_HOME` or ./.lorafleet).
        name: the sweep folder's name; default `<sweep name>-<UTC timestamp>` (always new).
    """
    from lorafleet.tasks import get_task

    home = (home or default_home()).resolve()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"sweep config not found: {path}"])
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping"])
    raw = apply_overrides(raw, overrides or [])
    raw["overrides"] = _flatten(raw.get("overrides") or {})
    raw["space"] = _flatten(raw.get("space") or {}, stop_at_specs=True)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (see configs/tiny/sweep-classification.yaml for the valid keys)"
            problems += [f"{loc}: {m}" if loc else m for m in (msg.split("; ") if not loc else [msg])]
        raise ConfigError(str(path), problems) from None

    train_path = (path.parent / sweep.train_config).resolve()
    if not train_path.is_file():
        raise ConfigError(str(path), [f"train_config {sweep.train_config!r}: {train_path} not found"])
    train_raw = yaml.safe_load(train_path.read_text()) or {}
    storage = sweep.storage_path.replace("${home}", str(home))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(storage).expanduser().resolve() / (name or f"{sweep.name}-{stamp}")
    probe = SweepSpec(sweep=sweep, train_raw=train_raw, sweep_dir=str(sweep_dir), home=str(home),
                      metric="?", mode="max", created=stamp)
    # Every dotted key must mean something to the training config: build one trial from example
    # values (the ConfigError then lists every bad key at once).
    example = {k: p.example() for k, p in sweep.space.items() if p.tied_to is None}
    cfg = trial_config(probe, example)
    task = get_task(cfg.task.name)
    if cfg.method.name == "feature":
        raise ConfigError(str(path), ["method 'feature' trains no steps and reports no curve; sweep lora/partial/full/head"])
    return probe.model_copy(update={"metric": f"val_{task.primary_metric}", "mode": task.mode})


# --- Ray ----------------------------------------------------------------------------------------


# --- the trial ------------------------------------------------------------------------------------


def _report_callback(metric: str):
    """TuneReportCallback that forwards only evaluation reports (those carrying the metric).

    Tune checks that every result has the metric ASHA and the searcher use; the training loop
    also reports loss every `log_every` steps without it. Those stay in train_log.jsonl.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def run_trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable: resolve this trial's config, run its TorchTrainer, re-raise errors.

    Runs in a Tune trial actor that holds no CPU (see `build_tuner`); the TorchTrainer asks for
    the trial's workers itself. The Train run is named after the trial, so a trial restarted by
    --resume continues from its last checkpoint instead of starting over.
    """
    import ray
    from ray import tune

    from lorafleet.base_model import load_tokenizer
    from lorafleet.finetune import CONFIG_FILE, load_splits
    from lorafleet.tasks import get_task
    from lorafleet.train import build_dataset, build_trainer

    spec_obj = SweepSpec.model_validate(spec)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec_obj, params, trial_id)
    run_dir = Path(cfg.run.storage_path) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(cfg))
    ray.data.DataContext.get_current().enable_progress_bars = False

    task = get_task(cfg.task.name)
    labels = list(cfg.task.labels or task.labels) or None
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data = load_splits(cfg, tokenizer, labels)
    trainer = build_trainer(
        cfg,
        build_dataset(data["train_encoded"], tokenizer.pad_token_id),
        run_name=trial_id,
        val_rows=[ex.row for ex in data["examples"]["validation"]],
        labels=labels,
        log_path=str(run_dir / "train_log.jsonl"),
        callbacks=[_report_callback(spec_obj.metric)],
    )
    result = trainer.fit()
    if result.error:
        raise result.error


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
            for e in _read_events(Path(events).parent):
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


def _trainable(spec: SweepSpec):
    from ray import tune

    # The trial's own driver holds no CPU: its TorchTrainer reserves the workers. Tune rejects an
    # all-zero request ({"CPU": 0}); a token amount of `memory`, a resource every node has, is
    # accepted and leaves the CPUs to the workers, so max_concurrent_trials x workers fill the cluster.
    return tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(mode="json")), {"CPU": 0, "memory": 2**20}
    )


def build_tuner(spec: SweepSpec):
    """A fresh Tuner for `spec`; writes sweep.json first so an interrupted sweep can be resumed."""
    from ray import tune

    sweep_dir = Path(spec.sweep_dir)
    if sweep_dir.exists():
        raise FileExistsError(f"sweep folder {sweep_dir} exists; resume it with `lorafleet sweep --resume {sweep_dir}`")
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    cfg = trial_config(spec, {k: p.example() for k, p in spec.sweep.space.items() if p.tied_to is None})
    s = spec.sweep.search
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=spec.metric, mode=spec.mode, seed=s.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # A user-made BasicVariantGenerator ignores TuneConfig.max_concurrent_trials (all trials
        # started at once): it must get the cap itself.
        search_alg = BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials)
    scheduler = _asha(spec, cfg) if spec.sweep.scheduler.name == "asha" else None
    return tune.Tuner(
        _trainable(spec),
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=spec.sweep.num_samples(),
            max_concurrent_trials=s.max_concurrent_trials,
            time_budget_s=s.time_budget_s,
            trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            callbacks=[_event_logger(str(sweep_dir))],
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
    tuner = tune.Tuner.restore(str(sweep_dir), trainable=_trainable(spec), resume_unfinished=True, resume_errored=True)
    return spec, tuner


def read_spec(sweep_dir: str | Path) -> SweepSpec:
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {sweep_dir} a lorafleet sweep folder (<home>/sweeps/<name>)?")
    return SweepSpec.model_validate_json(path.read_text())


# --- results --------------------------------------------------------------------------------------


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


def _read_events(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def summarize(spec: SweepSpec, grid, wall_time_s: float) -> SweepReport:
    """Rank the trials of a finished sweep by their best validation metric; one dict per trial."""
    sweep_dir = Path(spec.sweep_dir)
    events = _read_events(sweep_dir)
    asha = {e["trial_id"]: e for e in events if e["event"] == "asha_stop"}
    starts: dict[str, int] = {}
    for e in events:
        if e["event"] == "start":
            starts[e["trial_id"]] = starts.get(e["trial_id"], 0) + 1
    sign = 1 if spec.mode == "max" else -1
    trials = []
    for result in grid:
        trial_id = Path(result.path).name
        params = {k: v for k, v in (result.config or {}).items() if k in spec.sweep.space}
        cfg = trial_config(spec, params, trial_id)
        history = _history(result)
        evals = [h for h in history if spec.metric in h]
        # The trial's best evaluation whose checkpoint Ray Train kept (it keeps the best K by score).
        kept = [h for h in evals if h.get("checkpoint_path") and Path(h["checkpoint_path"]).is_dir()]
        best = max(kept or evals, key=lambda h: (sign * h[spec.metric], -h["step"]), default=None)
        last_step = int(history[-1]["step"]) if history else 0
        status = "error" if result.error else ("asha" if trial_id in asha else
                 ("done" if last_step >= cfg.train.max_steps else "stopped"))
        trials.append({
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
        })
    key = "best_" + spec.metric

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


def cfg_value(cfg: FinetuneConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def register_best(spec: SweepSpec, report: SweepReport, promote: bool = False) -> SweepReport:
    """Score the winner's best checkpoint on the test split and register it (sweep name in metadata).

    The test metric is computed exactly as `lorafleet eval` computes it (same split reader, same
    `load_for_eval` + `evaluate_rows`), so re-evaluating the registered version gives the same number.
    """
    from lorafleet.data import read_split
    from lorafleet.evaluate import evaluate_rows, load_for_eval
    from lorafleet.finetune import RunSummary, _metadata
    from lorafleet.registry import Registry
    from lorafleet.tasks import get_task
    from lorafleet.train import MODEL_DIR

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
    task = get_task(cfg.task.name)
    labels = list(cfg.task.labels or task.labels) or None
    model_dir = Path(winner["best_checkpoint"]) / MODEL_DIR
    rows = [ex.row for ex in read_split(cfg.data.test, task, "test", fields=cfg.data.fields,
                                        synthetic_n=cfg.data.synthetic_sizes.get("test"), seed=cfg.data.seed)]
    model, tok, _ = load_for_eval(model_dir, cfg.model.name_or_path, cfg.model.dtype)
    test_metrics = evaluate_rows(model, tok, task, rows, labels)
    best = {"trial_id": winner["trial_id"], "params": winner["params"], spec.metric: winner["best_" + spec.metric],
            "step": winner["best_step"], "checkpoint": winner["best_checkpoint"], "test_metrics": test_metrics}
    report = report.model_copy(update={"best": best})
    if not spec.sweep.registry.enabled:
        return report
    summary = RunSummary(
        run_name=winner["trial_id"], run_dir=str(Path(cfg.run.storage_path) / winner["trial_id"]),
        method=cfg.method.name, task=task.name, test_metrics=test_metrics,
        trainable_params=winner["trainable_params"], total_params=0, wall_time_s=winner["wall_time_s"],
        steps=winner["best_step"], artifact_dir=str(model_dir),
    )
    metadata = _metadata(cfg, summary, labels)
    metadata.pop("total_params", None)
    metadata["sweep"] = {"name": spec.sweep.name, "dir": spec.sweep_dir, "trial_id": winner["trial_id"],
                         "metric": spec.metric, "value": winner["best_" + spec.metric], "params": winner["params"],
                         "trials": len(report.trials)}
    entry = Registry(Path(spec.home) / "registry").register(
        spec.sweep.registry.name or cfg.name, model_dir, metadata, promote=promote
    )
    return report.model_copy(update={"registered": entry.ref, "promoted": promote})


def write_outputs(report: SweepReport, table_text: str) -> None:
    sweep_dir = Path(report.sweep_dir)
    (sweep_dir / RESULTS_FILE).write_text(report.model_dump_json(indent=2))
    (sweep_dir / TABLE_FILE).write_text(table_text)
    plot(report, sweep_dir / PLOT_FILE)


# --- the whole flow ----------------------------------------------------------------------------------


def _finish(spec: SweepSpec, grid, started: float, promote: bool, console=None) -> SweepReport:
    report = register_best(spec, summarize(spec, grid, time.time() - started), promote)
    text = print_table(report, console)
    write_outputs(report, text)
    return report


def run_sweep(spec: SweepSpec, promote: bool = False, console=None) -> SweepReport:
    """Run a sweep to the end: Tune trials, table, plot, results.json, registered winner."""
    started = time.time()
    init_ray()
    grid = build_tuner(spec).fit()
    return _finish(spec, grid, started, promote, console)


def resume_sweep(sweep_dir: str | Path, promote: bool = False, console=None) -> SweepReport:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue."""
    started = time.time()
    spec = read_spec(sweep_dir)
    init_ray()
    spec, tuner = restore_tuner(sweep_dir)
    grid = tuner.fit()
    first = min((e["time"] for e in _read_events(Path(spec.sweep_dir))), default=started)
    return _finish(spec, grid, min(first, started), promote, console)

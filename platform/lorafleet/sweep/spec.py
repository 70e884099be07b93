"""A runnable sweep: the validated sweep config, the training config it starts from, its folder,
and each trial's resolved training config."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lorafleet.config import ConfigError, FinetuneConfig, apply_overrides, default_home, parse_config, read_yaml
from lorafleet.config.sweep import SweepConfig, flatten_dotted, load_sweep_config

__all__ = ["SweepSpec", "load_sweep", "read_spec", "trial_config", "variant_configs", "example_params", "SPEC_FILE",
           "RESULTS_FILE", "PLOT_FILE", "TABLE_FILE", "EVENTS_FILE", "TRIALS_DIR"]

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.json"
PLOT_FILE = "sweep.png"
TABLE_FILE = "table.txt"
EVENTS_FILE = "events.jsonl"
TRIALS_DIR = "trials"  # Ray Train's storage for the trials: trials/<trial_id>/checkpoint_*


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


def example_params(spec: SweepSpec) -> dict[str, Any]:
    """One value of every sampled key (tied keys are computed from them)."""
    return {k: p.example() for k, p in spec.sweep.space.items() if p.tied_to is None}


def variant_configs(spec: SweepSpec, limit: int = 64) -> dict[str, FinetuneConfig]:
    """Trial configs that span the space, by label: every choice/grid value and both ends of each range
    (the planner checks these: a trial's memory grows with its rank or batch). Past `limit` combinations,
    each key's values in turn, the other keys at their example value."""
    axes: dict[str, list[Any]] = {}
    for key, p in spec.sweep.space.items():
        if p.tied_to is None:
            values = getattr(p, p.kind())
            axes[key] = [values[0], values[1] - 1] if p.kind() == "randint" else list(values)
    if math.prod(len(v) for v in axes.values()) <= limit:
        sets = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    else:
        base = example_params(spec)
        sets = [{**base, key: v} for key, values in axes.items() for v in values]
    return {"trial " + " ".join(f"{k}={v}" for k, v in params.items()): trial_config(spec, params) for params in sets}


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_id: str | None = None) -> FinetuneConfig:
    """The resolved training config of one trial: training YAML + overrides + sampled params (+ ties)."""
    raw = apply_overrides(spec.train_raw, spec.fixed_overrides())
    sampled = {k: v for k, v in params.items() if k in spec.sweep.space}
    raw = apply_overrides(raw, _dotted(sampled))
    flat = flatten_dotted(raw)
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
    sweep = load_sweep_config(path, overrides)
    train_path = (path.parent / sweep.train_config).resolve()
    if not train_path.is_file():
        raise ConfigError(str(path), [f"train_config {sweep.train_config!r}: {train_path} not found"])
    train_raw = read_yaml(train_path, "training config")
    storage = sweep.storage_path.replace("${home}", str(home))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(storage).expanduser().resolve() / (name or f"{sweep.name}-{stamp}")
    probe = SweepSpec(sweep=sweep, train_raw=train_raw, sweep_dir=str(sweep_dir), home=str(home),
                      metric="?", mode="max", created=stamp)
    # Every dotted key must mean something to the training config: build one trial from example
    # values (the ConfigError then lists every bad key at once).
    cfg = trial_config(probe, example_params(probe))
    task = get_task(cfg.task.name)
    if cfg.method.name == "feature":
        raise ConfigError(str(path), ["method 'feature' trains no steps and reports no curve; sweep lora/partial/full/head"])
    return probe.model_copy(update={"metric": f"val_{task.primary_metric}", "mode": task.mode})


def read_spec(sweep_dir: str | Path) -> SweepSpec:
    """The spec a sweep folder was started with (sweep.json): what --resume continues."""
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {sweep_dir} a lorafleet sweep folder (<home>/sweeps/<name>)?")
    return SweepSpec.model_validate_json(path.read_text())

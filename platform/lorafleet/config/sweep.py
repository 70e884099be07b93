"""The sweep config's schema: a training config, a search space over its dotted keys, how to
search, schedule and register. Loaded and reported through `lorafleet.config.base`, like every
config; `lorafleet.sweep` turns a validated one into a runnable `SweepSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lorafleet.config.base import Section, load_raw, problems_error, validate

__all__ = [
    "DISTRIBUTIONS",
    "EXAMPLE",
    "ParamSpec",
    "SearchSettings",
    "SchedulerSettings",
    "ResourceSettings",
    "RegisterSettings",
    "SweepConfig",
    "flatten_dotted",
    "parse_sweep_config",
    "load_sweep_config",
]

DISTRIBUTIONS = ("choice", "grid", "loguniform", "uniform", "randint", "tied_to")
EXAMPLE = "configs/tiny/sweep-classification.yaml"  # where an unknown key's message points


class ParamSpec(Section):
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
        chosen = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(chosen) != 1:
            return [f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {chosen or 'none'}); "
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
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def example(self) -> Any:
        """A value this dimension can take (used to validate the key against the training config)."""
        kind = self.kind()
        if kind in ("choice", "grid"):
            return getattr(self, kind)[0]
        if kind == "randint":
            return int(self.randint[0])
        return float(getattr(self, kind)[0]) if kind != "tied_to" else None


class SearchSettings(Section):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: Tune's variant generator; grid: every combination; optuna: TPE."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Trials to sample (random/optuna, default 8); grid: repeats of the grid (default 1)."
    )
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop every trial after this many seconds.")
    seed: int = Field(0, description="Seed of the sampler (random and optuna).")


class SchedulerSettings(Section):
    name: Literal["asha", "fifo"] = Field("asha", description="asha: early stopping; fifo: run every trial to the end.")
    grace_period: int | None = Field(
        None, ge=1, description="Steps before ASHA may stop a trial (default: 2 x train.eval_every)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung.")


class ResourceSettings(Section):
    """Resources of ONE trial: its Ray Train workers (the trial's own driver holds no CPU)."""

    num_workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (scaling.num_workers).")
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | None = None


class RegisterSettings(Section):
    enabled: bool = Field(True, description="Register the best trial's adapter.")
    name: str | None = Field(None, description="Registry name; default: the training config's name.")


class SweepConfig(Section):
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
        problems = [] if self.space else [
            "space is empty: give at least one dimension, e.g. train.lr: {loguniform: [1e-4, 1e-2]}"]
        for key, spec in self.space.items():
            own = spec.problems()
            problems += [f"space.{key}: {p}" for p in own] or self._key_problems(key, spec)
        if problems:
            raise problems_error(problems)
        return self

    def _key_problems(self, key: str, spec: ParamSpec) -> list[str]:
        """A well-formed dimension's problems with the rest of the sweep (ties, the search algorithm)."""
        out = []
        if spec.tied_to is not None and spec.tied_to not in self.space and spec.tied_to not in self.overrides:
            out.append(f"space.{key}: tied_to {spec.tied_to!r} is neither in space nor in overrides")
        if spec.tied_to is not None and self.space.get(spec.tied_to) is not None and self.space[spec.tied_to].tied_to:
            out.append(f"space.{key}: tied_to {spec.tied_to!r}, which is itself tied; tie to a sampled key")
        if self.search.algorithm == "grid" and spec.kind() in ("loguniform", "uniform", "randint"):
            out.append(
                f"space.{key}: {spec.kind()} cannot be enumerated by algorithm 'grid'; "
                "use {grid: [...]} / {choice: [...]}, or algorithm 'random' / 'optuna'"
            )
        if self.search.algorithm == "optuna" and spec.kind() == "grid":
            out.append(f"space.{key}: optuna cannot take a grid axis; use {{choice: [...]}}")
        return out

    def num_samples(self) -> int:
        return self.search.num_samples or (1 if self.search.algorithm == "grid" else 8)


def flatten_dotted(d: dict[str, Any], prefix: str = "", stop_at_specs: bool = False) -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; `--set overrides.train.lr=...` arrives nested.

    With `stop_at_specs`, a mapping holding a distribution key ({choice: [...]}) is a leaf.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        is_spec = stop_at_specs and isinstance(value, dict) and any(k in value for k in DISTRIBUTIONS)
        if isinstance(value, dict) and value and not is_spec:
            out.update(flatten_dotted(value, f"{full}.", stop_at_specs))
        else:
            out[full] = value
    return out


def parse_sweep_config(raw: dict[str, Any], source: str = "<dict>") -> SweepConfig:
    """Validate a raw sweep config (nested or dotted keys alike); every problem raised at once."""
    raw = {**raw, "overrides": flatten_dotted(raw.get("overrides") or {}),
           "space": flatten_dotted(raw.get("space") or {}, stop_at_specs=True)}
    return validate(SweepConfig, raw, source, EXAMPLE)


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML, apply dotted `--set` overrides (`search.num_samples=4`), validate it."""
    return parse_sweep_config(load_raw(path, overrides, "sweep config"), str(path))

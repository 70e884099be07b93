"""The compare (method ladder) config's schema: a base training config, the rungs, per-rung
overrides, few-shot k and the price per device-hour. Loaded and reported through
`lorafleet.config.base`; every rung's training config is validated here, before Ray starts."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafleet.config.base import ConfigError, Section, default_home, load_raw, read_yaml, validate
from lorafleet.config.finetune import FinetuneConfig, parse_config
from lorafleet.config.prompts import PromptTemplate, template_problems
from lorafleet.tasks import get_task

__all__ = [
    "RUNGS",
    "PROMPT_RUNGS",
    "CLASSIFICATION_ONLY",
    "CompareConfig",
    "Ladder",
    "parse_compare_config",
    "load_compare_config",
]

RUNGS: tuple[str, ...] = ("zero_shot", "few_shot", "feature", "head", "partial", "lora", "full")
PROMPT_RUNGS: tuple[str, ...] = ("zero_shot", "few_shot")
CLASSIFICATION_ONLY: tuple[str, ...] = ("feature", "head")

Rung = Literal["zero_shot", "few_shot", "feature", "head", "partial", "lora", "full"]


class CompareConfig(Section):
    """One ladder: a base training config, the rungs to run, and what a device-hour costs."""

    name: str = Field("ladder", description="Names the output folder and each rung's run ('<name>-<rung>').")
    base_config: str | None = Field(
        None, description="A training YAML (relative paths are relative to this file); 'base' is merged over it."
    )
    base: dict[str, Any] = Field(
        default_factory=dict, description="Inline training config keys (same schema as `lorafleet train`)."
    )
    rungs: list[Rung] | None = Field(
        None, description="Rungs to run, in order; default: every rung that fits the task."
    )
    overrides: dict[Rung, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-rung training config keys, dotted or nested, e.g. {full: {train.lr: 1.0e-3}}.",
    )
    few_shot_k: int = Field(3, ge=1, le=64, description="In-context train examples of the few_shot rung.")
    price_per_device_hour: float = Field(
        0.0, ge=0, description="Cost of one device (a GPU, or a CPU worker) for an hour; cost = wall x devices x price."
    )
    currency: str = Field("USD", description="Only a label in the report.")
    register_artifacts: bool = Field(False, description="Also register each trained rung's artifact in the registry.")
    output_dir: str = Field("${home}/compares", description="The ladder's folder goes under here.")
    prompts: list[PromptTemplate] = Field(
        default_factory=list, description="Templates for `lorafleet prompts` (default: task prompt, 0- and k-shot)."
    )


@dataclass
class Ladder:
    """A validated compare config with the resolved training config of every rung."""

    config: CompareConfig
    rungs: dict[str, FinetuneConfig]  # rung -> its resolved config, in run order
    source: str
    home: Path

    @property
    def task(self):
        return get_task(next(iter(self.rungs.values())).task.name)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{key!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _merge(raw: dict[str, Any], keys: dict[str, Any], prefix: str = "") -> None:
    """Merge nested and/or dotted `keys` into `raw` (leaves replace, sections merge)."""
    for key, value in keys.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            _merge(raw, value, dotted + ".")
        else:
            _set_dotted(raw, dotted, value)


def _base_raw(cc: CompareConfig, base_dir: Path | None, problems: list[str]) -> dict[str, Any]:
    """The base training config: base_config's YAML (if any) with the inline `base` keys over it."""
    base_raw: dict[str, Any] = {}
    if cc.base_config:
        path = Path(cc.base_config).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        if not path.is_file():
            problems.append(f"base_config: file not found: {cc.base_config} (relative paths are tried "
                            f"against {base_dir or '.'} and the working directory)")
        else:
            try:
                base_raw = read_yaml(path, "base_config")
            except ConfigError as err:
                problems += [f"base_config: {path}: {p}" for p in err.problems]
    _merge(base_raw, cc.base)
    return base_raw


def _rung_problems(cc: CompareConfig, rungs: list[str], task_name: str, default: list[str]) -> list[str]:
    problems = [] if rungs else ["rungs: empty; list at least one of " + ", ".join(default)]
    dupes = sorted({r for r in rungs if rungs.count(r) > 1})
    if dupes:
        problems.append(f"rungs: {dupes} listed more than once")
    for r in rungs:
        if r in CLASSIFICATION_ONLY and task_name != "classification":
            problems.append(f"rungs: {r!r} needs task 'classification' (task is {task_name!r}); "
                            f"for generative tasks use {[x for x in RUNGS if x not in CLASSIFICATION_ONLY]}")
    return problems


def _resolve_rungs(cc: CompareConfig, base_raw: dict[str, Any], rungs: list[str], task_name: str, source: str,
                   home: Path, problems: list[str]) -> dict[str, FinetuneConfig]:
    """Each rung's training config: base + its overrides + its method and name, validated."""
    resolved: dict[str, FinetuneConfig] = {}
    rung_problems: dict[str, list[str]] = {}  # a problem of the base config is reported once, naming its rungs
    for r in dict.fromkeys(rungs):
        rung_raw = copy.deepcopy(base_raw)
        try:
            _merge(rung_raw, cc.overrides.get(r, {}))
        except ValueError as err:
            problems.append(f"overrides.{r}: {err}")
            continue
        if r not in PROMPT_RUNGS:
            _set_dotted(rung_raw, "method.name", r)
        _set_dotted(rung_raw, "name", f"{cc.name}-{r.replace('_', '-')}")
        _set_dotted(rung_raw, "register_artifact", cc.register_artifacts)
        if r in CLASSIFICATION_ONLY and task_name != "classification":
            continue  # already reported, in words that name the rung
        try:
            resolved[r] = parse_config(rung_raw, f"{source} rung {r!r}", home)
        except ConfigError as err:
            for p in err.problems:
                rung_problems.setdefault(p, []).append(r)
    for p, where in rung_problems.items():
        problems.append(f"rung{'s' if len(where) > 1 else ''} {', '.join(where)}: {p}")
    return resolved


def parse_compare_config(raw: dict[str, Any], source: str = "<dict>", home: Path | None = None,
                         base_dir: Path | None = None) -> Ladder:
    """Validate a raw compare config and every rung's training config; all problems raised at once."""
    home = home or default_home()
    cc = validate(CompareConfig, raw, source)
    problems: list[str] = []
    base_raw = _base_raw(cc, base_dir, problems)
    try:
        task = get_task((base_raw.get("task") or {}).get("name", "classification"))
    except ValueError as err:
        raise ConfigError(source, problems + [f"base.task.name: {err}"]) from None

    default = [r for r in RUNGS if task.name == "classification" or r not in CLASSIFICATION_ONLY]
    rungs = list(cc.rungs) if cc.rungs is not None else default
    problems += _rung_problems(cc, rungs, task.name, default)
    # Overrides of rungs not listed are ignored, so `--set rungs=[lora]` works on any shipped config
    # (their keys are rung names, checked by the schema, so a typo cannot hide here).
    problems += [f"prompts: {p}" for p in template_problems(cc.prompts, task)]
    resolved = _resolve_rungs(cc, base_raw, rungs, task.name, source, home, problems)
    if problems:
        raise ConfigError(source, problems)
    return Ladder(cc, resolved, source, home)


def load_compare_config(path: str | Path, overrides: list[str] | None = None, home: Path | None = None) -> Ladder:
    """Read a compare YAML, apply dotted overrides (`--set base.train.max_steps=60`), validate it all."""
    raw = load_raw(path, overrides, "compare config")
    return parse_compare_config(raw, str(path), home, Path(path).resolve().parent)

"""The method ladder: prompting vs feature-based vs head vs partial vs LoRA vs full, side by side.

Every rung runs for real on the same base model, task and data splits, and records what it
measured: the test metric, trainable parameters, wall time, peak memory (process RSS on CPU, max
allocated on GPU), checkpoint size, tokens/s and a cost (wall time x devices x price per
device-hour). Nothing in a ladder report is typed in.

  zero_shot, few_shot   the base model under the task's prompt contract (k train examples before
                        the query for few_shot); one Ray task each, on one device
  feature               frozen-model features + logistic regression (classification only)
  head                  a linear head on the frozen model (classification only)
  partial, lora, full   Ray Train runs of `lorafleet.finetune`

A compare config is a base training config (a YAML path and/or inline keys), the rungs, per-rung
overrides (e.g. a lower lr for full), few-shot k and the price per device-hour; see
configs/tiny/compare-classification.yaml and docs/COMPARE.md.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.config import ConfigError, FinetuneConfig, default_home, dump_config, format_errors, parse_config
from lorafleet.prompts import PromptTemplate, template_problems
from lorafleet.tasks import get_task

__all__ = [
    "RUNGS",
    "PROMPT_RUNGS",
    "CompareConfig",
    "Ladder",
    "RungResult",
    "load_compare_config",
    "parse_compare_config",
    "new_output_dir",
    "run_rung",
    "run_ladder",
    "rank_rows",
]

RUNGS: tuple[str, ...] = ("zero_shot", "few_shot", "feature", "head", "partial", "lora", "full")
PROMPT_RUNGS: tuple[str, ...] = ("zero_shot", "few_shot")
CLASSIFICATION_ONLY: tuple[str, ...] = ("feature", "head")

Rung = Literal["zero_shot", "few_shot", "feature", "head", "partial", "lora", "full"]


class CompareConfig(BaseModel):
    """One ladder: a base training config, the rungs to run, and what a device-hour costs."""

    model_config = ConfigDict(extra="forbid")

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


@dataclass
class RungResult:
    """What one rung measured."""

    rung: str
    kind: str  # "prompt" | "train"
    method: str
    metric: str  # the task's primary metric
    value: float
    test_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    wall_time_s: float
    peak_memory_mb: float
    artifact_bytes: int
    tokens_per_s: float
    devices: int
    device_hours: float
    cost: float
    steps: int = 0
    rank: int = 0
    run_dir: str | None = None
    artifact_dir: str | None = None
    registered: str | None = None
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- config ------------------------------------------------------------------------------------


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


def parse_compare_config(raw: dict[str, Any], source: str = "<dict>", home: Path | None = None,
                         base_dir: Path | None = None) -> Ladder:
    """Validate a raw compare config and every rung's training config; all problems raised at once."""
    home = home or default_home()
    try:
        cc = CompareConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, format_errors(err)) from None
    problems: list[str] = []

    base_raw: dict[str, Any] = {}
    if cc.base_config:
        path = Path(cc.base_config).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        if not path.is_file():
            problems.append(f"base_config: file not found: {cc.base_config} (relative paths are tried "
                            f"against {base_dir or '.'} and the working directory)")
        else:
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                problems.append(f"base_config: {path} must hold a mapping of sections")
            else:
                base_raw = loaded
    _merge(base_raw, cc.base)
    task_name = (base_raw.get("task") or {}).get("name", "classification")
    try:
        task = get_task(task_name)
    except ValueError as err:
        raise ConfigError(source, problems + [f"base.task.name: {err}"]) from None

    default = [r for r in RUNGS if task.name == "classification" or r not in CLASSIFICATION_ONLY]
    rungs = list(cc.rungs) if cc.rungs is not None else default
    if not rungs:
        problems.append("rungs: empty; list at least one of " + ", ".join(default))
    dupes = sorted({r for r in rungs if rungs.count(r) > 1})
    if dupes:
        problems.append(f"rungs: {dupes} listed more than once")
    for r in rungs:
        if r in CLASSIFICATION_ONLY and task.name != "classification":
            problems.append(f"rungs: {r!r} needs task 'classification' (task is {task.name!r}); "
                            f"for generative tasks use {[x for x in RUNGS if x not in CLASSIFICATION_ONLY]}")
    # Overrides of rungs not listed are ignored, so `--set rungs=[lora]` works on any shipped config
    # (their keys are rung names, checked above, so a typo cannot hide here).
    problems += [f"prompts: {p}" for p in template_problems(cc.prompts, task)]

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
        if r in CLASSIFICATION_ONLY and task.name != "classification":
            continue  # already reported above, in words that name the rung
        try:
            resolved[r] = parse_config(rung_raw, f"{source} rung {r!r}", home)
        except ConfigError as err:
            for p in err.problems:
                rung_problems.setdefault(p, []).append(r)
    for p, where in rung_problems.items():
        problems.append(f"rung{'s' if len(where) > 1 else ''} {', '.join(where)}: {p}")
    if problems:
        raise ConfigError(source, problems)
    return Ladder(cc, resolved, source, home)


def load_compare_config(path: str | Path, overrides: list[str] | None = None, home: Path | None = None) -> Ladder:
    """Read a compare YAML, apply dotted overrides (`--set base.train.max_steps=60`), validate it all."""
    from lorafleet.config import apply_overrides

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"compare config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a mapping"])
    return parse_compare_config(apply_overrides(raw, overrides or []), str(path), home, path.resolve().parent)


def new_output_dir(ladder: Ladder, out: str | Path | None = None) -> Path:
    """The ladder's folder (`out`, or a fresh <output_dir>/<name>-<UTC stamp>), with the resolved configs."""
    if out is not None:
        out = Path(out).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        root = Path(ladder.config.output_dir.replace("${home}", str(ladder.home))).expanduser().resolve()
        out = root / f"{ladder.config.name}-{stamp}"
        n = 1
        while out.exists():
            n += 1
            out = root / f"{ladder.config.name}-{stamp}-{n}"
        out.mkdir(parents=True)
    resolved = {"compare": ladder.config.model_dump(mode="json"),
                "rungs": {r: c.model_dump(mode="json") for r, c in ladder.rungs.items()}}
    (out / "compare-config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return out


# --- running -----------------------------------------------------------------------------------


def _devices(cfg: FinetuneConfig, rung: str) -> int:
    # Prompting and the feature baseline run as one Ray task on one device; training on N workers.
    return 1 if rung in PROMPT_RUNGS or rung == "feature" else cfg.scaling.num_workers


def _cost(wall_s: float, devices: int, price: float) -> tuple[float, float]:
    hours = wall_s / 3600 * devices
    return round(hours, 6), round(hours * price, 6)


def _read_rows(cfg: FinetuneConfig, split: str) -> list[dict[str, Any]]:
    from lorafleet.data import read_split

    task = get_task(cfg.task.name)
    return [ex.row for ex in read_split(getattr(cfg.data, split), task, split, fields=cfg.data.fields,
                                        synthetic_n=cfg.data.synthetic_sizes.get(split), seed=cfg.data.seed)]


def _prompt_task(cfg_json: dict[str, Any], k: int, test_rows: list[dict], train_rows: list[dict],
                 labels: list[str] | None) -> dict[str, Any]:
    """Runs in a fresh Ray worker (max_calls=1), so its peak RSS is this rung's alone."""
    import resource

    import torch

    from lorafleet.evaluate import load_for_eval
    from lorafleet.methods import count_params
    from lorafleet.prompts import PromptTemplate, score_prompt

    cfg = FinetuneConfig.model_validate(cfg_json)
    task = get_task(cfg.task.name)
    started = time.perf_counter()
    model, tokenizer, _ = load_for_eval(None, cfg.model.name_or_path, cfg.model.dtype)
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        model = model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    template = PromptTemplate(name=f"{k}-shot", k=k)
    score = score_prompt(model, tokenizer, task, test_rows, template=template, train_rows=train_rows,
                         labels=labels, max_len=cfg.data.max_seq_len, seed=cfg.data.seed)
    wall = time.perf_counter() - started  # model load + scoring: the whole cost of answering by prompt
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"metrics": score.metrics, "wall": wall, "peak_mb": peak, "tokens_per_s": score.tokens_per_s,
            "total_params": count_params(model)[1], "shots": score.shots_used_mean,
            "prompt_tokens": score.prompt_tokens_mean}


def _run_prompt_rung(rung: str, cfg: FinetuneConfig, ladder: Ladder) -> RungResult:
    import ray

    task = get_task(cfg.task.name)
    labels = list(cfg.task.labels or task.labels) or None
    k = ladder.config.few_shot_k if rung == "few_shot" else 0
    test_rows = _read_rows(cfg, "test")
    train_rows = _read_rows(cfg, "train") if k else []
    remote = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                        max_calls=1)(_prompt_task)
    out = ray.get(remote.remote(cfg.model_dump(mode="json"), k, test_rows, train_rows, labels))
    devices = _devices(cfg, rung)
    hours, cost = _cost(out["wall"], devices, ladder.config.price_per_device_hour)
    notes = f"k={k}, {out['shots']:.1f} shots fit on average" if k else "task prompt, no examples"
    return RungResult(
        rung=rung, kind="prompt", method="prompt", metric=task.primary_metric,
        value=out["metrics"][task.primary_metric], test_metrics=out["metrics"], trainable_params=0,
        total_params=int(out["total_params"]), wall_time_s=round(out["wall"], 2),
        peak_memory_mb=round(out["peak_mb"], 1), artifact_bytes=0, tokens_per_s=round(out["tokens_per_s"], 1),
        devices=devices, device_hours=hours, cost=cost,
        notes=notes + f"; {out['prompt_tokens']:.0f} prompt tokens on average",
    )


def _dir_bytes(path: str | Path | None) -> int:
    if not path or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run_train_rung(rung: str, cfg: FinetuneConfig, ladder: Ladder, out_dir: Path, progress: bool) -> RungResult:
    from lorafleet.finetune import finetune

    cfg = cfg.model_copy(deep=True)
    cfg.run.storage_path = str(out_dir / "runs")
    cfg.run.name = None  # unique run names: reusing one would silently resume an old run
    s = finetune(cfg, registry_root=ladder.home / "registry", progress=progress)
    artifact = Path(s.artifact_dir)  # inside the rung's run folder, under the ladder's folder
    task = get_task(cfg.task.name)
    devices = _devices(cfg, rung)
    hours, cost = _cost(s.wall_time_s, devices, ladder.config.price_per_device_hour)
    notes = {"feature": "frozen last-token features + logistic regression",
             "head": "linear head on the frozen model",
             "partial": f"last {cfg.method.partial_layers} block(s) + final norm + output layer",
             "lora": f"r={cfg.method.lora.r}, alpha={cfg.method.lora.alpha:g}, "
                     f"{cfg.method.lora.target_modules if isinstance(cfg.method.lora.target_modules, str) else '+'.join(cfg.method.lora.target_modules)}",
             "full": "every weight"}[rung]
    if rung != "feature":
        notes += f"; lr={cfg.train.lr:g}, {s.steps} steps x {cfg.train.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum} rows"
    return RungResult(
        rung=rung, kind="train", method=s.method, metric=task.primary_metric,
        value=s.test_metrics.get(task.primary_metric, 0.0), test_metrics=s.test_metrics,
        trainable_params=s.trainable_params, total_params=s.total_params, wall_time_s=s.wall_time_s,
        peak_memory_mb=s.peak_memory_mb, artifact_bytes=s.artifact_bytes or _dir_bytes(artifact),
        tokens_per_s=s.tokens_per_s, devices=devices, device_hours=hours, cost=cost, steps=s.steps,
        run_dir=s.run_dir, artifact_dir=str(artifact), registered=s.registered, notes=notes,
    )


def run_rung(rung: str, ladder: Ladder, out_dir: Path, *, progress: bool = False) -> RungResult:
    """Run one rung of `ladder` for real and return what it measured."""
    cfg = ladder.rungs[rung]
    if rung in PROMPT_RUNGS:
        return _run_prompt_rung(rung, cfg, ladder)
    return _run_train_rung(rung, cfg, ladder, out_dir, progress)


def rank_rows(rows: list[RungResult], mode: str) -> list[RungResult]:
    """Set each row's rank by the metric (best first); ties go to fewer trainable parameters."""
    sign = -1 if mode == "max" else 1
    order = sorted(rows, key=lambda r: (sign * round(r.value, 6), r.trainable_params, RUNGS.index(r.rung)))
    for i, r in enumerate(order, start=1):
        r.rank = i
    return rows


def run_ladder(ladder: Ladder, out_dir: Path | None = None, *, progress: bool = False,
               log: Callable[[str], None] | None = None) -> tuple[list[RungResult], Path]:
    """Run every rung in order, then write the report (ladder.json, report.md, ladder.png).

    Returns the rows (in run order, ranked) and the ladder's folder.
    """
    from lorafleet.finetune import init_ray
    from lorafleet.report import write_report

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = out_dir or new_output_dir(ladder)
    init_ray()
    rows: list[RungResult] = []
    for rung in ladder.rungs:
        log(f"[compare] rung {rung}: running")
        row = run_rung(rung, ladder, out_dir, progress=progress)
        log(f"[compare] rung {rung}: {row.metric}={row.value:.4f} trainable={row.trainable_params:,} "
            f"wall={row.wall_time_s:.1f}s")
        rows.append(row)
    rank_rows(rows, ladder.task.mode)
    write_report(rows, out_dir, ladder)
    return rows, out_dir

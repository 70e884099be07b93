"""The method ladder: prompting vs feature-based vs head vs partial vs LoRA vs full, side by side.

Every rung runs for real on the same base model, task and data splits, and records what it
measured: the test metric, trainable parameters, wall time, peak memory (process RSS on CPU, max
allocated on GPU), checkpoint size, tokens/s and a cost (wall time x devices x price per
device-hour). Nothing in a ladder report is typed in.

  zero_shot, few_shot   the base model under the task's prompt contract (k train examples before
                        the query for few_shot); one Ray task each, on one device
  feature               frozen-model features + logistic regression (classification only)
  head                  a linear head on the frozen model (classification only)
  partial, lora, full   Ray Train runs of `lorafleet.train.recipe.finetune`

A compare config is a base training config (a YAML path and/or inline keys), the rungs, per-rung
overrides (e.g. a lower lr for full), few-shot k and the price per device-hour; see
configs/tiny/compare-classification.yaml and docs/COMPARE.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from lorafleet.config import FinetuneConfig, registry_root
from lorafleet.config.compare import PROMPT_RUNGS, RUNGS, Ladder
from lorafleet.cluster import init_ray
from lorafleet.train.clusters import Cluster, running_cluster
from lorafleet.train.context import read_rows, task_labels
from lorafleet.train.plan import refuse_misfits
from lorafleet.tracking import Tracker, attach_run, start_run
from lorafleet.train.results import Measures, dir_bytes
from lorafleet.tasks import get_task

__all__ = ["RungResult", "failed_rung", "new_output_dir", "rank_rows", "refuse_rung_misfits", "run_ladder", "run_rung"]


@dataclass(kw_only=True)
class RungResult(Measures):
    """What one rung measured: a run's measures (`lorafleet.train.results.Measures`) plus the
    ladder's own columns."""

    rung: str
    kind: str  # "prompt" | "train"
    method: str
    metric: str  # the task's primary metric
    value: float | None  # None for a rung that failed
    devices: int
    device_hours: float
    cost: float
    rank: int = 0
    notes: str = ""
    status: str = "ok"  # "failed": the rung raised (out of memory, infeasible, ...); `notes` says why
    tracking_run_id: str | None = None  # the rung's MLflow run, when tracked

    def as_dict(self) -> dict[str, Any]:
        """The row as ladder.json and `--json` print it: the ladder's columns first, as they always were."""
        row = asdict(self)
        return {k: row[k] for k in _ROW_KEYS} | row


_ROW_KEYS = ("rung", "kind", "method", "metric", "value", "test_metrics", "trainable_params", "total_params",
             "wall_time_s", "peak_memory_mb", "artifact_bytes", "tokens_per_s", "devices", "device_hours", "cost",
             "steps", "rank", "run_dir", "artifact_dir", "registered", "notes")


def failed_rung(rung: str, ladder: Ladder, err: BaseException) -> RungResult:
    """The row of a rung that failed: its reason, and no measures (ranked after every rung that ran)."""
    cfg = ladder.rungs[rung]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # Ray's errors end with the root cause ("ValueError: ..."), after the tracebacks.
    reason = f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return RungResult(
        rung=rung, kind="prompt" if rung in PROMPT_RUNGS else "train", method=rung if rung not in PROMPT_RUNGS else "prompt",
        metric=get_task(cfg.task.name).primary_metric, value=None, test_metrics={}, trainable_params=0,
        total_params=0, wall_time_s=0.0, devices=_devices(cfg, rung), device_hours=0.0, cost=0.0,
        status="failed", notes=f"failed: {reason[:500]}",
    )


# --- running -----------------------------------------------------------------------------------


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


def _devices(cfg: FinetuneConfig, rung: str) -> int:
    # Prompting and the feature baseline run as one Ray task on one device; training on N workers.
    return 1 if rung in PROMPT_RUNGS or rung == "feature" else cfg.scaling.num_workers


def _cost(wall_s: float, devices: int, price: float) -> tuple[float, float]:
    hours = wall_s / 3600 * devices
    return round(hours, 6), round(hours * price, 6)


def _prompt_task(cfg_json: dict[str, Any], k: int, test_rows: list[dict], train_rows: list[dict],
                 labels: list[str] | None) -> dict[str, Any]:
    """Runs in a fresh Ray worker (max_calls=1), so its peak RSS is this rung's alone."""
    import resource

    import torch

    from lorafleet.base_model import model_skeleton
    from lorafleet.config.prompts import PromptTemplate
    from lorafleet.evaluate import open_for_eval
    from lorafleet.prompts import score_prompt
    from lorafleet.train.methods import count_params

    cfg = FinetuneConfig.model_validate(cfg_json)
    task = get_task(cfg.task)  # the run's labels and instruction line, not the synthetic defaults
    started = time.perf_counter()
    with open_for_eval(None, cfg) as (model, tokenizer, _):  # eval.engine: transformers or vLLM
        if cfg.scaling.use_gpu and torch.cuda.is_available():
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
            "total_params": count_params(model_skeleton(cfg.model.name_or_path, cfg.model.dtype))[1],
            "shots": score.shots_used_mean,
            "prompt_tokens": score.prompt_tokens_mean}


def _run_prompt_rung(rung: str, cfg: FinetuneConfig, ladder: Ladder) -> RungResult:
    import ray

    task, labels = task_labels(cfg)
    k = ladder.config.few_shot_k if rung == "few_shot" else 0
    test_rows = read_rows(cfg, "test")
    train_rows = read_rows(cfg, "train") if k else []
    remote = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                        accelerator_type=cfg.scaling.accelerator_type, max_calls=1)(_prompt_task)
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


def _run_train_rung(rung: str, cfg: FinetuneConfig, ladder: Ladder, out_dir: Path, progress: bool,
                    tracker: Tracker | None) -> RungResult:
    from lorafleet.train.recipe import finetune

    cfg = cfg.model_copy(deep=True)
    cfg.run.storage_path = str(out_dir / "runs")
    cfg.run.name = None  # unique run names: reusing one would silently resume an old run
    s = finetune(cfg, registry_root=registry_root(ladder.home), progress=progress, tracking_parent=tracker)
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
    measures = {**s.measures(), "artifact_bytes": s.artifact_bytes or dir_bytes(artifact), "artifact_dir": str(artifact)}
    return RungResult(
        **measures, rung=rung, kind="train", method=s.method, metric=task.primary_metric,
        value=s.test_metrics.get(task.primary_metric, 0.0), devices=devices, device_hours=hours, cost=cost, notes=notes,
        tracking_run_id=s.tracking_run_id,
    )


def run_rung(rung: str, ladder: Ladder, out_dir: Path, *, progress: bool = False,
             tracker: Tracker | None = None) -> RungResult:
    """Run one rung of `ladder` for real and return what it measured; with `tracker` (the ladder's
    tracked run), the rung is its child run: a training rung's is `finetune`'s own run."""
    cfg = ladder.rungs[rung]
    if rung not in PROMPT_RUNGS:
        return _run_train_rung(rung, cfg, ladder, out_dir, progress, tracker)
    child = tracker.child(f"{out_dir.name}-{rung}", config=cfg.model_dump(mode="json"),
                          tags={"lorafleet.kind": "rung", "lorafleet.rung": rung}) if tracker else None
    try:
        row = _run_prompt_rung(rung, cfg, ladder)
    except BaseException:
        if child is not None:
            child.finish(ok=False)
        raise
    if child is not None:
        child.log_metrics({f"test_{k}": v for k, v in row.test_metrics.items()}
                          | {"total_params": row.total_params, "wall_time_s": row.wall_time_s,
                             "peak_memory_mb": row.peak_memory_mb, "tokens_per_s": row.tokens_per_s})
        child.finish()
        row.tracking_run_id = child.run_id
    return row


def _track_rows(tracker: Tracker, rows: list[RungResult], out_dir: Path, ok: bool) -> None:
    """The ladder's results: each rung's ladder columns (value, rank, cost) on its own run, every rung's
    value on the ladder's run (one metric per rung), and the report's files; then the ladder's run ends."""
    from lorafleet.report import REPORT_FILES

    for r in rows:
        if r.tracking_run_id:
            rung = attach_run(tracker.settings, r.rung, r.tracking_run_id)
            rung.log_metrics({k: v for k, v in {"value": r.value, "rank": r.rank, "cost": r.cost, "devices": r.devices,
                                               "device_hours": r.device_hours}.items() if v is not None})
            rung.set_tags({"lorafleet.rung": r.rung, "lorafleet.notes": r.notes})
    tracker.log_metrics({f"{r.rung}_{r.metric}": r.value for r in rows if r.value is not None})
    tracker.set_tags({"lorafleet.failed_rungs": ",".join(r.rung for r in rows if r.status != "ok") or None})
    tracker.log_files([out_dir / name for name in REPORT_FILES.values()] + [out_dir / "compare-config.yaml"])
    tracker.finish(ok)


def rank_rows(rows: list[RungResult], mode: str) -> list[RungResult]:
    """Set each row's rank by the metric (best first); ties go to fewer trainable parameters."""
    sign = -1 if mode == "max" else 1
    order = sorted(rows, key=lambda r: (r.status != "ok", sign * round(r.value, 6) if r.status == "ok" else 0.0,
                                        r.trainable_params, RUNGS.index(r.rung)))
    for i, r in enumerate(order, start=1):
        r.rank = i
    return rows


def refuse_rung_misfits(ladder: Ladder, cluster: Cluster | None) -> None:
    """Refuse the ladder (PlanError) when the cluster cannot place or hold one of its rungs."""
    refuse_misfits({f"rung {r}": cfg for r, cfg in ladder.rungs.items()}, cluster, f"ladder {ladder.config.name}",
                   inference=tuple(f"rung {r}" for r in PROMPT_RUNGS))


def run_ladder(ladder: Ladder, out_dir: str | Path | None = None, *, progress: bool = False,
               log: Callable[[str], None] | None = None, cluster: Cluster | None = None) -> tuple[list[RungResult], Path]:
    """The whole ladder: its folder (with every rung's resolved config, written first), Ray, one
    real run per rung in order, the ranking, and the report (ladder.json, report.md, ladder.png).

    Args:
        ladder: a validated compare config (`load_compare_config`).
        out_dir: the ladder's folder; default a fresh <output_dir>/<name>-<UTC stamp>.
        progress: show each training rung's live progress bar.
        log: where progress lines go (default stderr).
        cluster: check every rung against it before anything starts (`--cluster`, `--gpus`); default:
            against the Ray cluster joined, where what it holds is known.

    Returns the rows (in run order, ranked) and the ladder's folder.

    Raises:
        PlanError: a rung cannot be placed or cannot fit (lorafleet.train.plan); no rung was run.
    """
    from lorafleet.report import write_report

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    refuse_rung_misfits(ladder, cluster)
    init_ray()  # the cluster this job was submitted to, or a private local instance
    if cluster is None:
        refuse_rung_misfits(ladder, running_cluster())
    out_dir = new_output_dir(ladder, out_dir)
    log(f"[compare] {ladder.task.name}: rungs {list(ladder.rungs)} -> {out_dir}")
    # The ladder's tracked run (the training config's tracking: block); each rung is a child run.
    tracker = start_run(next(iter(ladder.rungs.values())).tracking, out_dir.name,
                        config=ladder.config.model_dump(mode="json"),
                        tags={"lorafleet.kind": "ladder", "lorafleet.ladder_dir": str(out_dir)})
    try:
        rows = _run_rungs(ladder, out_dir, progress, log, tracker)
        rank_rows(rows, ladder.task.mode)
        write_report(rows, out_dir, ladder)
    except BaseException:
        tracker.finish(ok=False)
        raise
    _track_rows(tracker, rows, out_dir, ok=True)
    return rows, out_dir


def _run_rungs(ladder: Ladder, out_dir: Path, progress: bool, log: Callable[[str], None],
               tracker: Tracker) -> list[RungResult]:
    rows: list[RungResult] = []
    for rung in ladder.rungs:
        log(f"[compare] rung {rung}: running")
        try:
            row = run_rung(rung, ladder, out_dir, progress=progress, tracker=tracker if tracker.enabled else None)
        except Exception as err:  # noqa: BLE001 - one rung's failure (out of memory, infeasible) ends only that rung
            row = failed_rung(rung, ladder, err)
            log(f"[compare] rung {rung}: {row.notes}; going on with the next rung")
            rows.append(row)
            continue
        log(f"[compare] rung {rung}: {row.metric}={row.value:.4f} trainable={row.trainable_params:,} "
            f"wall={row.wall_time_s:.1f}s peak={row.peak_memory_mb:.0f}MB")
        rows.append(row)
    return rows

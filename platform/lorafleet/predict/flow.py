"""`run_predict`: a predict run from settings to part files, top to bottom.

  1. columns: every adapter resolved to its exact version and checked as serving checks it, each
     with its task as trained (`columns.plan_columns`)
  2. rows: read as training reads them, bad ones reported with file and line and skipped (`rows.read_rows`)
  3. blocks of ``block_rows`` rows; the output folder is claimed with a manifest, or found holding
     parts of this same run, whose blocks are skipped (`output.open_output`)
  4. Ray Data: the blocks left -> `map_batches` over an actor pool of ``replicas`` vLLM engines
     (`replica.PredictReplica`), each block answered in one engine call and written as its part file
  5. the driver counts rows as blocks finish (progress bar) and reports rows/s at the end
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.config.predict import PredictSettings
from lorafleet.offline_engine import CPU_ENGINE_KWARGS
from lorafleet.predict.columns import Plan, lora_rank_for, plan_columns
from lorafleet.predict.output import open_output, written_blocks
from lorafleet.predict.replica import EngineJob, PredictReplica
from lorafleet.predict.rows import BadRow, blocks, read_rows
from lorafleet.uri import is_uri

__all__ = ["PredictResult", "run_predict"]

SHOWN_BAD_ROWS = 20  # bad rows printed one by one; the rest are counted


@dataclass
class PredictResult:
    """What a predict run did."""

    out: str
    columns: dict[str, str]  # column -> exact version (or base)
    rows: int  # usable rows in the data
    blocks: int
    resumed_blocks: int  # blocks found already written and skipped
    written: int  # rows this run wrote
    seconds: float  # this run, Ray and engine start-up included
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bad_rows": [f"{w}: {p}" for w, p in self.bad_rows],
                "rows_per_s": round(self.rows_per_s, 1), "seconds": round(self.seconds, 1)}


def run_predict(settings: PredictSettings, *, home: str | Path, registry_root: str | Path,
                progress: bool = True) -> PredictResult:
    """Predict every row of ``settings.data`` with every column of ``settings.adapters``.

    Raises:
        PredictError: an adapter cannot be used (unknown, not LoRA, another base, DoRA, no task).
        DataError: the data cannot be read at all, or has no usable row.
        FileExistsError: ``settings.out`` holds another run's output.
    """
    start = time.perf_counter()
    registry_root = registry_root if is_uri(registry_root) else Path(registry_root).resolve()  # replicas run elsewhere
    plan = plan_columns(settings, registry_root, home)
    examples, bad = read_rows(settings.data, plan.tasks(), fields=plan.fields, split=settings.split)
    out = settings.out if is_uri(settings.out) else str(Path(settings.out).resolve())
    ranges = blocks(len(examples), settings.block_rows)
    manifest = {"data": settings.data, "fields": plan.fields, "base_model": plan.base_model,
                "columns": {c.name: c.ref for c in plan.columns}, "tasks": {c.name: c.task.name for c in plan.columns},
                "budgets": {c.name: c.budget for c in plan.columns}, "rows": len(examples),
                "block_rows": settings.block_rows, "format": settings.format}
    resumed = written_blocks(out, settings.format) if open_output(out, manifest) else set()
    todo = [i for i in range(len(ranges)) if i not in resumed]
    result = PredictResult(out, manifest["columns"], len(examples), len(ranges), len(resumed & set(range(len(ranges)))),
                           0, 0.0, list(bad))
    if todo:
        items = [{"block": i, "rows": json.dumps([{"where": examples[j].where, "row": examples[j].row}
                                                  for j in ranges[i]], default=str)} for i in todo]
        written, engine_bad = _run_blocks(items, sum(len(ranges[i]) for i in todo), plan, settings, out,
                                          str(registry_root), progress)
        result.written = written
        result.bad_rows += engine_bad
    result.seconds = time.perf_counter() - start
    return result


def _run_blocks(items: list[dict[str, Any]], n_rows: int, plan: Plan, settings: PredictSettings, out: str,
                registry_root: str, progress: bool) -> tuple[int, list[BadRow]]:
    """The blocks through Ray Data and the replicas; (rows written, rows the engines skipped)."""
    import ray

    from lorafleet.cluster import init_ray

    # Locally, one logical CPU per replica plus one for Ray Data's own tasks (the engines are not busy
    # all the time on a small machine; ../shared/ENV.md: an ingress waiting forever for a CPU).
    init_ray(num_cpus=max(os.cpu_count() or 1, settings.replicas + 1))
    gpu = settings.accelerator == "gpu" or (settings.accelerator == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    job = EngineJob(plan.base_model, registry_root, plan.columns, out, settings.format,
                    settings.max_model_len, _engine_kwargs(plan, settings, gpu),
                    _engine_env(settings, gpu))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    results = ds.map_batches(PredictReplica, fn_constructor_kwargs={"job": job}, batch_size=1,
                             concurrency=settings.replicas, num_cpus=1, num_gpus=1 if gpu else 0)
    written, bad = 0, []
    with _Progress(n_rows, show=progress) as bar:
        for row in results.iter_rows():
            written += int(row["written"])
            engine_bad = [tuple(b) for b in json.loads(row["bad"])]
            bad += engine_bad
            bar.advance(int(row["written"]) + len(engine_bad))
    return written, bad


def _engine_env(settings: PredictSettings, gpu: bool) -> dict[str, str]:
    """The replicas' environment: the CPU KV cache size; vLLM's per-engine INFO lines only when asked for
    (they reach the driver's stdout through Ray, several hundred lines per replica)."""
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if not gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
        # The engine in the replica's own process. Otherwise vLLM on CPU starts two more per replica (its
        # engine core, and a worker: CPU forces the multiprocessing executor), each importing vLLM and
        # torch again; a replica answers one block at a time, so nothing overlaps with them anyway.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def _engine_kwargs(plan: Plan, settings: PredictSettings, gpu: bool) -> dict[str, Any]:
    """vLLM's engine arguments: serving's (LoRA slots for every column's adapter, fp32, eager and 32-token
    KV blocks on CPU)."""
    n_adapters = sum(1 for c in plan.columns if c.ref != "base")
    # One device per replica: vLLM's in-process executor ("uni", as ray.data.llm picks for one bundle) spares
    # the worker process (and its imports) that the default executor starts on CPU.
    kwargs: dict[str, Any] = {"max_model_len": settings.max_model_len, "dtype": settings.dtype,
                              "disable_log_stats": True, "distributed_executor_backend": "uni"}
    if n_adapters:
        kwargs.update(enable_lora=True, max_loras=n_adapters, max_lora_rank=lora_rank_for(plan.columns))
    if not gpu:
        kwargs.update(CPU_ENGINE_KWARGS)  # eager, and KV blocks small enough for label prompts to be shared
    return kwargs


class _Progress:
    """Rows done of ``total`` and rows/s, on stderr (rich), or nothing."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show

    def __enter__(self) -> "_Progress":
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 console=Console(file=sys.stderr))
            self._bar.start()
            self._task = self._bar.add_task("predict", total=self.total, rate="")
            self._start = time.perf_counter()
        return self

    def advance(self, n: int) -> None:
        if self.show:
            self._bar.advance(self._task, n)
            done = self._bar.tasks[0].completed
            self._bar.update(self._task, rate=f"{done / max(time.perf_counter() - self._start, 1e-9):.1f} rows/s")

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self._bar.stop()

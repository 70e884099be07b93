"""Experiment tracking: a run's config, step metrics, results and files, sent to MLflow and/or
written as TensorBoard event files (the `tracking:` block, `lorafleet.config.tracking`).

Everything is logged from the driver, through MLflow's client (`MlflowClient`), never from Ray
workers: the driver already receives rank 0's step records (the progress queue of a run, a sweep
trial's train_log.jsonl), only the driver needs to reach the tracking server (a loopback or VPN
server works; Ray workers on other nodes need no route to it), and one process owns each MLflow run.
A sweep is a parent run with one child per trial, a ladder a parent with one child per rung.

Starting a run raises `TrackingError` when the server cannot be reached, before any training
starts; once a run is under way, a failed log call is a warning: tracking never costs a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from lorafleet.config.tracking import MLFLOW_URI_ENV, TrackingConfig

__all__ = ["Tracker", "TrackingError", "flatten_params", "step_metrics", "start_run", "attach_run", "PARENT_TAG"]

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
_MAX_PARAMS, _MAX_METRICS = 100, 1000  # MLflow's log_batch limits (mlflow.utils.validation)
_MAX_VALUE, _MAX_KEY = 6000, 250
# Fields of a step record that are not curves: bookkeeping, or constants logged once as results.
_NOT_CURVES = {"step", "time", "trainable_params", "total_params", "resumed_from", "worker_nodes"}


class TrackingError(RuntimeError):
    """The tracking server could not be reached (or refused) when a run started."""


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (`train.lr`), values as JSON text (`0.002`,
    `true`, `null`, `["q_proj", "v_proj"]`), plain strings as they are; cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = re.sub(r"[^\w\-. /:]", "_", f"{prefix}{key}")[:_MAX_KEY]
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:_MAX_VALUE]
    return out


def step_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The curves of one step record (rank 0's train_log.jsonl line): loss, lr, tokens_per_s,
    step_time_s, epoch, peak_memory_mb and any val_* metric; finite numbers only."""
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """One run's sinks: an MLflow run and/or a TensorBoard writer; without either, every call does nothing.

    Safe to call from the progress thread and the main thread at once (one lock)."""

    def __init__(self, name: str, *, client: Any = None, run_id: str | None = None, writer: Any = None,
                 tb_dir: Path | None = None, settings: TrackingConfig | None = None):
        self.name = name
        self.client, self.run_id, self.writer, self.tb_dir = client, run_id, writer, tb_dir
        self.settings = settings or TrackingConfig()
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.client is not None or self.writer is not None

    def _mlflow(self, what: str, call, *args, **kwargs) -> None:
        if self.client is None:
            return
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking never fails a run that is under way
            if not self._warned:
                log.warning("MLflow: %s failed for run %s (%s); the run goes on, later failures are not shown",
                            what, self.run_id, err)
                self._warned = True

    def log_params(self, config: dict[str, Any]) -> None:
        """The resolved config, flattened (`flatten_params`), in MLflow's batches of 100."""
        with self._lock:
            if self.client is not None:
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in flatten_params(config).items()]
                for i in range(0, len(items), _MAX_PARAMS):
                    self._mlflow("log params", self.client.log_batch, self.run_id, params=items[i:i + _MAX_PARAMS])
            if self.writer is not None:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_metrics(self, metrics: dict[str, float], step: int = 0, at: float | None = None) -> None:
        """Numbers at one step (results at step 0 or the last step); `at`: when, in seconds (default now)."""
        self.log_records([(step, at or time.time(), metrics)])

    def log_records(self, records: Iterable[tuple[int, float, dict[str, float]]]) -> None:
        """Many (step, time_s, metrics) at once, in MLflow's batches of 1000."""
        records = list(records)
        with self._lock:
            if self.client is not None:
                from mlflow.entities import Metric

                items = [Metric(k, float(v), int(t * 1000), int(step)) for step, t, ms in records for k, v in ms.items()]
                for i in range(0, len(items), _MAX_METRICS):
                    self._mlflow("log metrics", self.client.log_batch, self.run_id, metrics=items[i:i + _MAX_METRICS])
            if self.writer is not None:
                for step, t, ms in records:
                    for k, v in ms.items():
                        self.writer.add_scalar(k, v, step, walltime=t)

    def log_steps(self, records: Iterable[dict[str, Any]]) -> None:
        """Rank 0's step records (the progress queue, a train_log.jsonl): each record's curves at its step."""
        self.log_records((int(r["step"]), float(r.get("time") or time.time()), step_metrics(r))
                         for r in records if "step" in r)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_VALUE]) for k, v in tags.items() if v is not None]
        with self._lock:
            self._mlflow("set tags", self.client.log_batch, self.run_id, tags=items)

    def log_files(self, paths: Iterable[str | Path | None]) -> None:
        """Upload existing local files as artifacts (settings.mlflow.log_artifacts); others are skipped."""
        if self.client is None or not self.settings.mlflow.log_artifacts:
            return
        for path in paths:
            if path and Path(path).is_file():
                with self._lock:
                    self._mlflow(f"upload {Path(path).name}", self.client.log_artifact, self.run_id, str(path))

    def finish(self, ok: bool = True) -> None:
        """End the run: FINISHED, or FAILED (a run that raised)."""
        with self._lock:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            # MLflow prints the run's URL on stdout at the end; stderr keeps `--json` output clean.
            with contextlib.redirect_stdout(sys.stderr):
                if self.client is not None:
                    self._mlflow("end run", self.client.set_terminated, self.run_id, "FINISHED" if ok else "FAILED")

    def child(self, name: str, *, tags: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> "Tracker":
        """A run nested under this one (a sweep's trial, a ladder's rung), in the same experiment and folder."""
        return start_run(self.settings, name, parent=self, tags=tags, config=config)


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another driver created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _writer(settings: TrackingConfig, name: str, parent: Tracker | None) -> tuple[Any, Path | None]:
    root = parent.tb_dir if parent is not None and parent.tb_dir is not None else settings.tensorboard.dir
    if not root:
        return None, None
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(root) / name
    return SummaryWriter(log_dir=str(folder)), folder


def start_run(settings: TrackingConfig, name: str, *, parent: Tracker | None = None,
              tags: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Tracker:
    """Open a tracked run named `name` (a child of `parent`), log `config` as its params and `tags`.

    With MLflow and TensorBoard both off it returns a Tracker that does nothing.

    Raises:
        TrackingError: MLflow is on but has no tracking URI, or its server cannot be reached.
    """
    uri = settings.mlflow.uri()
    if settings.mlflow.enabled and uri is None:
        raise TrackingError(f"tracking.mlflow.enabled is true but no server is named: set tracking.mlflow.tracking_uri "
                            f"or {MLFLOW_URI_ENV}")
    client = run_id = None
    if uri is not None:
        client, run_id = _create_mlflow_run(uri, settings, name, parent, tags)
    writer, folder = _writer(settings, name, parent)
    tracker = Tracker(name, client=client, run_id=run_id, writer=writer, tb_dir=folder, settings=settings)
    if config is not None:
        tracker.log_params(config)
    return tracker


def _create_mlflow_run(uri: str, settings: TrackingConfig, name: str, parent: Tracker | None,
                       tags: dict[str, Any] | None) -> tuple[Any, str]:
    from mlflow import MlflowClient

    all_tags = {**settings.mlflow.tags, **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
    try:
        client = MlflowClient(tracking_uri=uri)
        if parent is not None and parent.run_id is not None:
            experiment = client.get_run(parent.run_id).info.experiment_id
            all_tags[PARENT_TAG] = parent.run_id
        else:
            experiment = _experiment_id(client, settings.mlflow.experiment_name())
        run = client.create_run(experiment, run_name=name, tags=all_tags)
    except Exception as err:  # noqa: BLE001 - any client error here means: nothing will be tracked
        raise TrackingError(f"MLflow at {uri}: cannot start run {name!r} in experiment "
                            f"{settings.mlflow.experiment_name()!r}: {err}") from err
    return client, run.info.run_id


def attach_run(settings: TrackingConfig, name: str, run_id: str | None, tb_dir: str | Path | None = None,
               *, write: bool = True) -> Tracker:
    """A Tracker for a run started earlier (a sweep's parent or trial, seen again by its callback or
    after --resume): MLflow calls go to `run_id`, TensorBoard files to `tb_dir` (with `write`; without,
    `tb_dir` only places children's folders)."""
    uri = settings.mlflow.uri()
    client = None
    if uri is not None and run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
    writer = None
    if tb_dir is not None and write:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tb_dir))
    return Tracker(name, client=client, run_id=run_id if client else None, writer=writer,
                   tb_dir=Path(tb_dir) if tb_dir else None, settings=settings)

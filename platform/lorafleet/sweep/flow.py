"""A whole sweep, top to bottom: Ray -> Tune trials -> rank -> score and register the winner ->
table, figure and results.json. `lorafleet sweep` and `tune/sweep.py` both call these."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.report.sweep import print_table
from lorafleet.cluster import init_ray
from lorafleet.sweep.results import SweepReport, register_best, summarize, write_outputs
from lorafleet.sweep.spec import SweepSpec, read_spec, variant_configs
from lorafleet.sweep.tracking import finish_sweep, start_sweep
from lorafleet.sweep.tuner import build_tuner, read_events, restore_tuner
from lorafleet.train.clusters import Cluster, running_cluster
from lorafleet.train.plan import refuse_misfits

__all__ = ["run_sweep", "resume_sweep"]


def _finish(spec: SweepSpec, tuner, started: float, promote: bool, console=None) -> SweepReport:
    """Run the trials, then rank, register, report; the sweep's tracked run (parent of the trials') ends
    with it, FAILED if anything raised."""
    tracker = start_sweep(spec)
    try:
        grid = tuner.fit()
        report = register_best(spec, summarize(spec, grid, time.time() - started), promote)
        text = print_table(report, console)
        write_outputs(report, text)
    except BaseException:
        tracker.finish(ok=False)
        raise
    finish_sweep(spec, tracker, report)
    return report


def _refuse_misfits(spec: SweepSpec, cluster: Cluster | None) -> None:
    """Refuse a sweep whose trials the cluster cannot place or hold (lorafleet.train.plan): the given
    cluster before Ray starts, else the one Ray joined."""
    refuse_misfits(variant_configs(spec), cluster or running_cluster(), f"sweep {spec.sweep.name}")


def run_sweep(spec: SweepSpec, promote: bool = False, console=None, cluster: Cluster | None = None) -> SweepReport:
    """Run a sweep to the end: Tune trials, table, plot, results.json, registered winner.

    `cluster` (`--cluster`, `--gpus`): check every trial against it before Ray starts; default: against
    the Ray cluster joined, where what it holds is known. Raises PlanError when a trial cannot run there."""
    started = time.time()
    if cluster is not None:
        _refuse_misfits(spec, cluster)
    init_ray()  # the cluster this job was submitted to, or a private local instance
    if cluster is None:
        _refuse_misfits(spec, None)
    return _finish(spec, build_tuner(spec), started, promote, console)


def resume_sweep(sweep_dir: str | Path, promote: bool = False, console=None) -> SweepReport:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue.

    Its wall time counts from the sweep's first event, so it covers the interrupted part too.
    """
    started = time.time()
    read_spec(sweep_dir)  # not a sweep folder: fail before Ray starts
    init_ray()
    spec, tuner = restore_tuner(sweep_dir)
    _refuse_misfits(spec, None)
    first = min((e["time"] for e in read_events(Path(spec.sweep_dir))), default=started)
    return _finish(spec, tuner, min(first, started), promote, console)

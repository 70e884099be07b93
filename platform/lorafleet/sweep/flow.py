"""A whole sweep, top to bottom: Ray -> Tune trials -> rank -> score and register the winner ->
table, figure and results.json. `lorafleet sweep` and `tune/sweep.py` both call these."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.report.sweep import print_table
from lorafleet.run import init_ray
from lorafleet.sweep.results import SweepReport, register_best, summarize, write_outputs
from lorafleet.sweep.spec import SweepSpec, read_spec
from lorafleet.sweep.tuner import build_tuner, read_events, restore_tuner

__all__ = ["run_sweep", "resume_sweep"]


def _finish(spec: SweepSpec, grid, started: float, promote: bool, console=None) -> SweepReport:
    report = register_best(spec, summarize(spec, grid, time.time() - started), promote)
    text = print_table(report, console)
    write_outputs(report, text)
    return report


def run_sweep(spec: SweepSpec, promote: bool = False, console=None) -> SweepReport:
    """Run a sweep to the end: Tune trials, table, plot, results.json, registered winner."""
    started = time.time()
    init_ray()  # the cluster this job was submitted to, or a private local instance
    grid = build_tuner(spec).fit()
    return _finish(spec, grid, started, promote, console)


def resume_sweep(sweep_dir: str | Path, promote: bool = False, console=None) -> SweepReport:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue.

    Its wall time counts from the sweep's first event, so it covers the interrupted part too.
    """
    started = time.time()
    read_spec(sweep_dir)  # not a sweep folder: fail before Ray starts
    init_ray()
    spec, tuner = restore_tuner(sweep_dir)
    grid = tuner.fit()
    first = min((e["time"] for e in read_events(Path(spec.sweep_dir))), default=started)
    return _finish(spec, grid, min(first, started), promote, console)

"""Hyperparameter sweeps on Ray Tune: search space, the trial trainable, results, registering the best.

A sweep config (`lorafleet.config.sweep`) names a training config and a search space over its
dotted keys. Each Tune trial resolves one training config and runs the same `TorchTrainer` a plain
`lorafleet train` runs, inside a Tune *function trainable* (Ray 2.60's current pattern;
`Tuner(trainer)` is deprecated). Rank 0's validation reports reach Tune through
`TuneReportCallback`, so ASHA can stop a weak trial at its next evaluation. At the end the trials
are ranked by the task's validation metric, the winner's best checkpoint is scored on the test
split and registered. Layout of a sweep folder::

    <home>/sweeps/<sweep-name>/
        sweep.json              the resolved sweep (sweep config + the training config it starts from)
        events.jsonl            trial starts/completions/errors and ASHA stops, as they happen
        <trial_id>/             Tune's trial folder: params.json, result.json, progress.csv
        trials/<trial_id>/      lorafleet-config.yaml (resolved), train_log.jsonl, checkpoint_*/
        results.json            every trial, ranked, plus the winner (machine-readable)
        table.txt, sweep.png    the table printed at the end and the learning-curve/scatter figure
        experiment_state-*.json, tuner.pkl, ...   Tune's own state (what --resume restores)

Modules: `spec` (a runnable sweep, each trial's config), `trainable` (the Tune trainable),
`tuner` (search, ASHA, restore), `results` (ranking, the winner), `flow` (the whole sweep). The
table and the figure are in `lorafleet.report.sweep`.
"""

from lorafleet.config.sweep import ParamSpec, SweepConfig
from lorafleet.report.sweep import plot, print_table
from lorafleet.sweep.flow import resume_sweep, run_sweep
from lorafleet.sweep.results import SweepReport, register_best, summarize, write_outputs
from lorafleet.sweep.spec import (
    EVENTS_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    SPEC_FILE,
    TABLE_FILE,
    TRIALS_DIR,
    SweepSpec,
    load_sweep,
    read_spec,
    trial_config,
)
from lorafleet.sweep.trainable import run_trial
from lorafleet.sweep.tuner import build_tuner, restore_tuner

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
    "plot",
    "write_outputs",
    "read_spec",
    "trial_config",
    "run_trial",
    "SPEC_FILE",
    "RESULTS_FILE",
    "PLOT_FILE",
    "TABLE_FILE",
    "EVENTS_FILE",
    "TRIALS_DIR",
]

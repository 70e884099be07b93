"""Sweep a training config's hyperparameters on Ray Tune (ASHA; random, grid or Optuna search),
then register the best trial's adapter.

Locally:       python tune/sweep.py --config configs/tiny/sweep-classification.yaml
On a cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- \
                   python tune/sweep.py --config configs/tiny/sweep-classification.yaml
Resume:        python tune/sweep.py --resume <home>/sweeps/<sweep-name>
`lorafleet sweep` runs the same code. Details: docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lorafleet.config import default_home
from lorafleet.finetune import init_ray
from lorafleet.sweep import (
    build_tuner,
    load_sweep,
    print_table,
    read_spec,
    register_best,
    restore_tuner,
    summarize,
    write_outputs,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="sweep YAML (see configs/tiny/sweep-classification.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override of the sweep YAML")
    parser.add_argument("--name", help="sweep folder name (default: <sweep name>-<UTC time>)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    parser.add_argument("--promote", action="store_true", help="make the registered winner live")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    if args.home:
        os.environ["LORAFLEET_HOME"] = str(Path(args.home).resolve())
    started = time.time()

    # 1. Config: the sweep and the training config it names, validated before any trial starts.
    spec = read_spec(args.resume) if args.resume else load_sweep(args.config, args.set, default_home(), args.name)

    # 2. Ray: the cluster this job was submitted to, or a private local instance.
    init_ray()

    # 3. Tune: one function trainable per trial, each running its own TorchTrainer; ASHA stops the
    #    weak ones. A resumed sweep keeps its finished trials and continues the others.
    tuner = restore_tuner(args.resume)[1] if args.resume else build_tuner(spec)
    grid = tuner.fit()

    # 4. Rank the trials, score the winner on the test split, register it.
    report = register_best(spec, summarize(spec, grid, time.time() - started), promote=args.promote)

    # 5. The table, the figure and results.json in the sweep folder; one JSON line for the submitter.
    write_outputs(report, table_text=print_table(report))
    print(json.dumps({k: v for k, v in report.model_dump().items() if k != "trials"}))


if __name__ == "__main__":
    main()

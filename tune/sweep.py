"""Sweep a training config's hyperparameters on Ray Tune (ASHA; random, grid or Optuna search),
then register the best trial's adapter.

Locally:       python tune/sweep.py --config configs/tiny/sweep-classification.yaml
On a cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- \
                   python tune/sweep.py --config configs/tiny/sweep-classification.yaml
Resume:        python tune/sweep.py --resume <home>/sweeps/<sweep-name>
`lorafleet sweep` runs the same code (`lorafleet.sweep.run_sweep` / `resume_sweep`): config ->
Ray -> Tune trials (ASHA stops the weak ones) -> rank -> score and register the winner -> table,
figure and results.json in the sweep folder. Details: docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import json

from lorafleet.config import set_home
from lorafleet.sweep import load_sweep, resume_sweep, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="sweep YAML (see configs/tiny/sweep-classification.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override of the sweep YAML")
    parser.add_argument("--name", help="sweep folder name (default: <sweep name>-<UTC time>)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    parser.add_argument("--promote", action="store_true", help="make the registered winner live")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    home = set_home(args.home)

    if args.resume:
        report = resume_sweep(args.resume, promote=args.promote)
    else:
        report = run_sweep(load_sweep(args.config, args.set, home, args.name), promote=args.promote)
    # One JSON line for the submitter (the table went to stdout above it).
    print(json.dumps({k: v for k, v in report.model_dump().items() if k != "trials"}))


if __name__ == "__main__":
    main()

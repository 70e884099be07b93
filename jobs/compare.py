"""The method ladder as a Ray job: every rung on the same base model, task and data, then a report.

    ray job submit --working-dir . -- python jobs/compare.py --config configs/tiny/compare-classification.yaml
    python jobs/compare.py --config configs/tiny/compare-qa.yaml --set base.train.max_steps=60   # smoke run

Reads top to bottom: config -> Ray -> one real run per rung -> rank -> report (ladder.json,
report.md, ladder.png in the ladder's folder). `lorafleet compare` runs the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorafleet.compare import load_compare_config, new_output_dir, rank_rows, run_rung
from lorafleet.config import ConfigError, default_home
from lorafleet.finetune import init_ray
from lorafleet.report import REPORT_FILES, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="compare YAML (configs/tiny/compare-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. base.train.max_steps=60 (the smoke knob) or rungs=[lora,full]")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    parser.add_argument("--out", help="the ladder's folder (default <output_dir>/<name>-<timestamp>)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last stdout line")
    args = parser.parse_args()
    if args.home:
        os.environ["LORAFLEET_HOME"] = str(Path(args.home).resolve())

    # 1. Config: the compare config and every rung's training config, validated before Ray starts.
    try:
        ladder = load_compare_config(args.config, args.set, default_home())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = new_output_dir(ladder, args.out)  # the resolved config of every rung is saved here first
    print(f"[compare] {ladder.task.name}: rungs {list(ladder.rungs)} -> {out_dir}", file=sys.stderr, flush=True)

    # 2. Ray: the cluster this job was submitted to, or a private local instance.
    init_ray()

    # 3. One real run per rung, in order: prompting rungs score the base model in a Ray task,
    #    feature runs as a Ray task, head/partial/lora/full are Ray Train runs.
    rows = []
    for rung in ladder.rungs:
        row = run_rung(rung, ladder, out_dir, progress=False)
        print(f"[compare] {rung}: {row.metric}={row.value:.4f} trainable={row.trainable_params:,} "
              f"wall={row.wall_time_s:.1f}s peak={row.peak_memory_mb:.0f}MB", file=sys.stderr, flush=True)
        rows.append(row)

    # 4. Rank by the test metric and write the report.
    rank_rows(rows, ladder.task.mode)
    paths = write_report(rows, out_dir, ladder)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
    else:
        print(paths["markdown"].read_text())
    print(f"[compare] report: {out_dir / REPORT_FILES['markdown']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

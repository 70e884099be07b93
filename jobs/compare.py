"""The method ladder as a Ray job: every rung on the same base model, task and data, then a report.

    ray job submit --working-dir . -- python jobs/compare.py --config configs/tiny/compare-classification.yaml
    python jobs/compare.py --config configs/tiny/compare-qa.yaml --set base.train.max_steps=60   # smoke run

`lorafleet.compare.run_ladder` does the steps (`lorafleet compare` runs the same): config -> Ray ->
one real run per rung -> rank -> report (ladder.json, report.md, ladder.png in the ladder's folder).
"""

from __future__ import annotations

import argparse
import json
import sys

from lorafleet.compare import run_ladder
from lorafleet.config.compare import load_compare_config
from lorafleet.config import ConfigError, set_home
from lorafleet.report import REPORT_FILES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="compare YAML (configs/tiny/compare-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. base.train.max_steps=60 (the smoke knob) or rungs=[lora,full]")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    parser.add_argument("--out", help="the ladder's folder (default <output_dir>/<name>-<timestamp>)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last stdout line")
    args = parser.parse_args()
    home = set_home(args.home)

    try:  # every rung's config is validated before Ray starts
        ladder = load_compare_config(args.config, args.set, home)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, out_dir = run_ladder(ladder, args.out)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
    else:
        print((out_dir / REPORT_FILES["markdown"]).read_text())
    print(f"[compare] report: {out_dir / REPORT_FILES['markdown']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

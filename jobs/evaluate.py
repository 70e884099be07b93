"""Evaluate a registered artifact (or the bare base model) on a split and write its metrics.

    python jobs/evaluate.py tickets-lora                  # the live version, test split
    python jobs/evaluate.py tickets-lora@2 --split validation --out metrics.json
    python jobs/evaluate.py base --config configs/tiny/classification-lora.yaml
`lorafleet eval` runs the same code.
"""

from __future__ import annotations

import argparse
import json

from lorafleet.config import set_home
from lorafleet.evaluate import evaluate_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="registry ref (name or name@version) or 'base'")
    parser.add_argument("--config", help="config for base model, task and data (default: the artifact's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", help="write the metrics JSON here too")
    parser.add_argument("--home")
    args = parser.parse_args()
    home = set_home(args.home)

    result = evaluate_artifact(args.artifact, config=args.config, overrides=args.set, split=args.split,
                               home=home, limit=args.limit, out=args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

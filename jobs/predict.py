"""Batch inference: registry adapters over a whole dataset, one output column each, on Ray Data + vLLM.

Locally:       python jobs/predict.py tickets data/tickets.jsonl --out preds/ --replicas 2
On a cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- \
                   python jobs/predict.py tickets s3://bucket/tickets.jsonl --adapter tickets@1 \
                   --out s3://bucket/preds/ --replicas 8
Run the same command again after an interruption: the blocks already written are skipped.
`lorafleet predict` runs the same code (and takes the same flags).
"""

from __future__ import annotations

import argparse
import json

from lorafleet.cli.predict import add_arguments, print_result, settings_from_args
from lorafleet.config import registry_root, set_home
from lorafleet.predict import run_predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    home = set_home(args.home)  # before Ray starts: its workers inherit the home

    # 1. Settings: validated here, on the driver, before Ray or any engine starts.
    settings = settings_from_args(args)

    # 2. Adapters -> rows -> blocks -> Ray Data over the vLLM replicas -> part files. Ray starts once
    #    blocks are left: the cluster this job was submitted to (RAY_ADDRESS), or a private local one.
    result = run_predict(settings, home=home, registry_root=registry_root(home), progress=False)

    # 3. Bad rows by file and line, then one JSON line for whoever submitted the job.
    print_result(result, as_json=False)
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()

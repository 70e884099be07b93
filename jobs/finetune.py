"""Fine-tune one model from one YAML config on Ray Train, then register the artifact.

Locally:       python jobs/finetune.py --config configs/tiny/classification-lora.yaml
On a cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- \
                   python jobs/finetune.py --config configs/tiny/classification-lora.yaml
`lorafleet train` runs the same code.
"""

from __future__ import annotations

import argparse
import json

from lorafleet.config import load_config, registry_root, set_home
from lorafleet.cluster import init_ray
from lorafleet.train.context import run_dir_config
from lorafleet.train.recipe import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    home = set_home(args.home)  # before Ray starts: its workers inherit the home

    # 1. Config: validated here, on the driver, before any worker starts.
    cfg = run_dir_config(args.resume) if args.resume else load_config(args.config, args.set, home)

    # 2. Ray: the cluster this job was submitted to, or a private local instance.
    init_ray()

    # 3. Data -> TorchTrainer -> best checkpoint -> test metrics -> registry.
    summary = finetune(cfg, registry_root=registry_root(home), resume_dir=args.resume, progress=False)

    # 4. One JSON line for whoever submitted the job.
    print(json.dumps(summary.as_dict()))


if __name__ == "__main__":
    main()

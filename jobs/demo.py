"""The demo (`make demo`): every task's LoRA adapter against the untuned base model, then serve them.

    python jobs/demo.py                       # the four tiny task configs, then serving
    python jobs/demo.py --no-serve            # training and the table only
    python jobs/demo.py --model smollm2       # classification on SmolLM2-135M-Instruct (make demo MODEL=smollm2)
    python jobs/demo.py --set train.max_steps=50 --configs configs/tiny/qa-lora.yaml

For each config: score the bare base model on the test split, fine-tune and register the adapter
(a real Ray Train run; its test metrics are computed after training), and put both side by side.
Then one Ray Serve application (vLLM, all adapters loaded on demand) answers one request per task
endpoint and one OpenAI-client completion, and prints request and answer (lorafleet.demo).
"""

from __future__ import annotations

import argparse

from lorafleet.config import set_home
from lorafleet.demo import MODEL_CONFIGS, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="tiny",
                        help="base model: tiny (every task, built locally) or smollm2 (SmolLM2-135M-Instruct, "
                             "classification; `make smollm2` imports it)")
    parser.add_argument("--configs", nargs="+", help="task configs (default: the --model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving part")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    run_demo(args.configs or MODEL_CONFIGS[args.model], args.set, set_home(args.home), serve=not args.no_serve)


if __name__ == "__main__":
    main()

"""The demo (`make demo`): every task's LoRA adapter against the untuned base model, then serve them.

    python jobs/demo.py                       # the four tiny task configs, then serving
    python jobs/demo.py --no-serve            # training and the table only
    python jobs/demo.py --set train.max_steps=50 --configs configs/tiny/qa-lora.yaml

For each config: score the bare base model on the test split, fine-tune and register the adapter
(a real Ray Train run; its test metrics are computed after training), and put both side by side.
Then one Ray Serve application (vLLM, all adapters loaded on demand) answers one request per task
endpoint and one OpenAI-client completion, and prints request and answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from lorafleet.config import default_home, load_config
from lorafleet.data import read_split
from lorafleet.evaluate import evaluate_artifact
from lorafleet.finetune import finetune, init_ray
from lorafleet.tasks import get_task

TASK_CONFIGS = [
    "configs/tiny/classification-lora.yaml",
    "configs/tiny/summarization-lora.yaml",
    "configs/tiny/translation-lora.yaml",
    "configs/tiny/qa-lora.yaml",
]
# Piped into a log, rich would fall back to 80 columns and cut the table's cells.
console = Console() if sys.stdout.isatty() else Console(width=132)


def train_and_compare(path: str, overrides: list[str], home: Path) -> dict[str, Any]:
    """Base model vs fine-tuned adapter on the test split of one task config."""
    cfg = load_config(path, overrides, home)
    metric = get_task(cfg.task.name).primary_metric
    console.rule(f"{cfg.task.name}: {path}")
    base = evaluate_artifact("base", config=path, overrides=overrides, home=home)["metrics"]
    console.print(f"untuned base model: test {metric} = {base[metric]:.4f}")
    summary = finetune(cfg, registry_root=home / "registry", progress=True)
    return {
        "task": cfg.task.name, "config": path, "metric": metric,
        "base": base[metric], "adapter": summary.test_metrics[metric], "registered": summary.registered,
        "trainable_pct": 100 * summary.trainable_params / max(1, summary.total_params),
        "steps": summary.steps, "wall_time_s": summary.wall_time_s,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="untuned base model vs LoRA adapter (test split)")
    for col in ("task", "metric", "base", "adapter", "trainable", "steps", "train time", "registered"):
        table.add_column(col, justify="right" if col in ("base", "adapter", "trainable", "steps", "train time") else "left")
    for r in rows:
        table.add_row(r["task"], r["metric"], f"{r['base']:.4f}", f"{r['adapter']:.4f}", f"{r['trainable_pct']:.2f}%",
                      str(r["steps"]), f"{r['wall_time_s']:.0f} s", r["registered"] or "-")
    console.print(table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_call(rows: list[dict[str, Any]], home: Path) -> None:
    """Serve every adapter just trained and call each task endpoint once, on a test example."""
    import httpx
    from openai import OpenAI

    from lorafleet.serving.cli import use_serve_fast_path

    use_serve_fast_path()  # as `lorafleet serve` does: HAProxy in front, before this Ray starts
    from ray import serve

    from lorafleet.serving.app import build_app

    adapters = {r["task"]: r["registered"] for r in rows if r["registered"]}
    port = _free_port()
    # Serving takes more logical CPUs than training (engine bundle + replica); see docs/SERVING.md.
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "VLLM_LOGGING_LEVEL": "WARNING"}})
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    quiet = {"log_level": "WARNING"}  # Serve's per-request access logs would bury the answers
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        started = time.time()
        settings = {"home": str(home), "model_id": "tiny", "base_model": "${home}/models/tiny",
                    "tasks": {task: ref.split("@")[0] for task, ref in adapters.items()}, "max_tokens": 64}
        serve.run(build_app(settings), name="lorafleet", route_prefix="/", logging_config=quiet)
        url = f"http://127.0.0.1:{port}"
        console.rule(f"serving at {url} (ready in {time.time() - started:.0f} s)")
        routes = {"classification": ("/v1/classify", "text"), "summarization": ("/v1/summarize", "text"),
                  "translation": ("/v1/translate", "text"), "qa": ("/v1/qa", "question")}
        with httpx.Client(base_url=url, timeout=300) as client:
            for r in rows:
                task = get_task(r["task"])
                cfg = load_config(r["config"], [], home)
                row = read_split("synthetic", task, "test", synthetic_n=1, seed=cfg.data.seed)[0].row
                route, field = routes[r["task"]]
                body = {field: row[field], "adapter": r["registered"]}
                if r["task"] == "qa":
                    body["context"] = row["context"]
                answer = client.post(route, json=body)
                console.print(f"[bold]POST {route}[/bold] {json.dumps(body)}", soft_wrap=True)
                console.print(f"  -> {answer.status_code} {answer.text}", soft_wrap=True)
                console.print(f"     reference answer: {task.target(row)!r}", soft_wrap=True)
        # The OpenAI-compatible API: the server applies the base model's chat template, which is
        # the prompt contract the adapter was trained on, so the first task's instruction works as is.
        first = rows[0]
        task = get_task(first["task"])
        row = read_split("synthetic", task, "test", synthetic_n=2, seed=load_config(first["config"], [], home).data.seed)[1].row
        openai = OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = openai.chat.completions.create(model=first["registered"], max_tokens=16, temperature=0,
                                             messages=[{"role": "user", "content": task.instruction(row)}])
        console.print(f"[bold]openai.chat.completions.create[/bold](model={first['registered']!r}, "
                      f"messages=[{{'role': 'user', 'content': {task.instruction(row)!r}}}])", soft_wrap=True)
        console.print(f"  -> {out.model}: {out.choices[0].message.content!r}", soft_wrap=True)
        console.print(f"     reference answer: {task.target(row)!r}", soft_wrap=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=TASK_CONFIGS, help="task configs (default: the four tiny ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving part")
    parser.add_argument("--home", help="lorafleet home (default $LORAFLEET_HOME or ./.lorafleet)")
    args = parser.parse_args()
    if args.home:
        os.environ["LORAFLEET_HOME"] = str(Path(args.home).resolve())
    home = default_home()
    started = time.time()

    # 1. Train: each task's adapter next to the untuned base model, on a private local Ray.
    init_ray()
    rows = [train_and_compare(path, args.set, home) for path in args.configs]
    ray.shutdown()
    print_table(rows)
    out = home / "demo-results.json"
    out.write_text(json.dumps(rows, indent=2))
    console.print(f"rows written to {out}")

    # 2. Serve: all adapters behind the task endpoints, one call each.
    if not args.no_serve:
        serve_and_call(rows, home)
        print_table(rows)  # the serving output is long: end with the table again
    console.print(f"demo finished in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

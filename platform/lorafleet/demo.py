"""The demo (`make demo`, `jobs/demo.py`): every task's LoRA adapter against the untuned base model,
then all of them served and called.

For each config: score the bare base model on the test split, fine-tune and register the adapter
(a real Ray Train run; its test metrics are computed after training), and put both side by side.
Then one Ray Serve application (vLLM, all adapters loaded on demand) answers one request per task
endpoint and one OpenAI-client completion, and prints request and answer.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from lorafleet.config import load_config, registry_root
from lorafleet.data import read_split
from lorafleet.evaluate import evaluate_artifact
from lorafleet.cluster import free_port, init_ray, start_local_ray
from lorafleet.train.recipe import finetune
from lorafleet.report.runs import demo_table
from lorafleet.tasks import TASK_ROUTES, get_task

__all__ = ["TASK_CONFIGS", "MODEL_CONFIGS", "run_demo", "train_and_compare", "serve_and_call"]

TASK_CONFIGS = [
    "configs/tiny/classification-lora.yaml",
    "configs/tiny/summarization-lora.yaml",
    "configs/tiny/translation-lora.yaml",
    "configs/tiny/qa-lora.yaml",
]
# `make demo MODEL=...`: the tiny base runs every task; the real SmolLM2-135M-Instruct (30 layers on
# 2 cores, ~5 s a step) runs one, so the demo stays minutes long.
MODEL_CONFIGS = {"tiny": TASK_CONFIGS, "smollm2": ["configs/smollm2/classification-lora.yaml"]}
# Piped into a log, rich would fall back to 80 columns and cut the table's cells.
console = Console() if sys.stdout.isatty() else Console(width=132)


def train_and_compare(path: str, overrides: list[str], home: Path) -> dict[str, Any]:
    """Base model vs fine-tuned adapter on the test split of one task config."""
    cfg = load_config(path, overrides, home)
    metric = get_task(cfg.task.name).primary_metric
    console.rule(f"{cfg.task.name}: {path}")
    base = evaluate_artifact("base", config=path, overrides=overrides, home=home)["metrics"]
    console.print(f"untuned base model: test {metric} = {base[metric]:.4f}")
    summary = finetune(cfg, registry_root=registry_root(home), progress=True)
    return {
        "task": cfg.task.name, "config": path, "metric": metric,
        "base": base[metric], "adapter": summary.test_metrics[metric], "registered": summary.registered,
        "trainable_pct": 100 * summary.trainable_params / max(1, summary.total_params),
        "steps": summary.steps, "wall_time_s": summary.wall_time_s,
    }


@contextmanager
def _serving(rows: list[dict[str, Any]], home: Path) -> Iterator[str]:
    """A local Ray Serve app with every adapter just trained; yields its URL."""
    import shutil

    import ray

    from lorafleet.serving.local import private_haproxy, use_serve_fast_path
    from lorafleet.serving._ray_serve import SETUP_HOOK

    use_serve_fast_path()  # as `lorafleet serve` does: HAProxy in front, before this Ray starts
    haproxy_folder = private_haproxy()  # and that HAProxy as `lorafleet serve` has it (docs/SERVING.md)
    from ray import serve

    from lorafleet.serving.app import build_app

    adapters = {r["task"]: r["registered"] for r in rows if r["registered"]}
    base_model = _served_base(rows, home)
    port = free_port()
    # Serving takes more logical CPUs than training (engine bundle + replica); see docs/SERVING.md.
    start_local_ray(num_cpus=4, include_dashboard=False,
                    runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "VLLM_LOGGING_LEVEL": "WARNING"},
                                 "worker_process_setup_hook": SETUP_HOOK})
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    quiet = {"log_level": "WARNING"}  # Serve's per-request access logs would bury the answers
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        started = time.time()
        settings = {"home": str(home), "model_id": Path(base_model).name, "base_model": base_model,
                    "tasks": {task: ref.split("@")[0] for task, ref in adapters.items()}, "max_tokens": 64}
        serve.run(build_app(settings), name="lorafleet", route_prefix="/", logging_config=quiet)
        url = f"http://127.0.0.1:{port}"
        console.rule(f"serving at {url} (ready in {time.time() - started:.0f} s)")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_folder, ignore_errors=True)


def _served_base(rows: list[dict[str, Any]], home: Path) -> str:
    """The one base model every trained adapter shares (one vLLM engine serves one base)."""
    bases = {load_config(r["config"], [], home).model.name_or_path for r in rows}
    if len(bases) != 1:
        raise ValueError(f"the demo serves one base model; these configs train on {sorted(bases)}")
    return bases.pop()


def _call_task_endpoints(url: str, rows: list[dict[str, Any]], home: Path) -> None:
    """One request per task endpoint, on a test example, with the reference answer."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for r in rows:
            task = get_task(r["task"])
            cfg = load_config(r["config"], [], home)
            row = read_split("synthetic", task, "test", synthetic_n=1, seed=cfg.data.seed)[0].row
            route, field = TASK_ROUTES[r["task"]], task.fields[0]  # the request names the text as rows do
            body = {field: row[field], "adapter": r["registered"]}
            if r["task"] == "qa":
                body["context"] = row["context"]
            answer = client.post(route, json=body)
            console.print(f"[bold]POST {route}[/bold] {json.dumps(body)}", soft_wrap=True)
            console.print(f"  -> {answer.status_code} {answer.text}", soft_wrap=True)
            console.print(f"     reference answer: {task.target(row)!r}", soft_wrap=True)


def _call_openai(url: str, first: dict[str, Any], home: Path) -> None:
    """The OpenAI-compatible API: the server applies the base model's chat template, which is the
    prompt contract the adapter was trained on, so the task's instruction works as is."""
    from openai import OpenAI

    task = get_task(first["task"])
    row = read_split("synthetic", task, "test", synthetic_n=2, seed=load_config(first["config"], [], home).data.seed)[1].row
    openai = OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = openai.chat.completions.create(model=first["registered"], max_tokens=16, temperature=0,
                                         messages=[{"role": "user", "content": task.instruction(row)}])
    console.print(f"[bold]openai.chat.completions.create[/bold](model={first['registered']!r}, "
                  f"messages=[{{'role': 'user', 'content': {task.instruction(row)!r}}}])", soft_wrap=True)
    console.print(f"  -> {out.model}: {out.choices[0].message.content!r}", soft_wrap=True)
    console.print(f"     reference answer: {task.target(row)!r}", soft_wrap=True)


def serve_and_call(rows: list[dict[str, Any]], home: Path) -> None:
    """Serve every adapter just trained and call each task endpoint once, on a test example."""
    with _serving(rows, home) as url:
        _call_task_endpoints(url, rows, home)
        _call_openai(url, rows[0], home)


def run_demo(configs: list[str], overrides: list[str], home: Path, serve: bool = True) -> list[dict[str, Any]]:
    """Train each config's adapter beside the untuned base model, print the table, write it to
    HOME/demo-results.json, then (with `serve`) serve and call them all. Returns the rows."""
    import ray

    started = time.time()
    # 1. Train: each task's adapter next to the untuned base model, on a private local Ray.
    init_ray()
    rows = [train_and_compare(path, overrides, home) for path in configs]
    ray.shutdown()
    console.print(demo_table(rows))
    out = home / "demo-results.json"
    out.write_text(json.dumps(rows, indent=2))
    console.print(f"rows written to {out}")

    # 2. Serve: all adapters behind the task endpoints, one call each.
    if serve:
        serve_and_call(rows, home)
        console.print(demo_table(rows))  # the serving output is long: end with the table again
    console.print(f"demo finished in {time.time() - started:.0f} s")
    return rows

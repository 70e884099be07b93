"""Scoring throughput: transformers (``eval.engine: hf``) against vLLM (``eval.engine: vllm``) on each task's
test split, and ``lorafleet predict`` against vLLM's own offline engine on the same rows (issue 31 item 4).

    .venv/bin/python bench/eval_throughput.py [--model smollm2|tiny] [--rows 64] [--predict-rows 512]

Per task (classification, summarization, translation, qa): a random LoRA adapter
(``serving.testing.make_lora_adapter``, rank 8 on q/k/v/o) registered with that task on the base, and
``--rows`` rows of the task's synthetic test split. Each engine scores the adapter as ``lorafleet eval``
does (``evaluate.open_for_eval`` + ``evaluate_rows``, fp32): the model load (hf) or engine start (vllm)
and the scoring are timed apart, and the metrics of the two engines are printed side by side (equal
answers give equal metrics).

Then, on ``--predict-task`` (default summarization) with ``--predict-rows`` rows: ``run_predict`` (what
``lorafleet predict`` runs: a private local Ray, Ray Data, one vLLM replica) against one offline
``vllm.LLM`` in this process with predict's engine settings, sent the very requests predict sends for
those rows (``predict.replica.answer_block``: one ``LLM.generate``). Both times include starting their
engine (predict: Ray and its actor too). Prints one JSON object with the ratios (issue 31's goal:
predict >= 0.9 of offline vLLM's rows/s), the machine, the date and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# vLLM logs to stdout by default; this bench's stdout is its one JSON object (replicas inherit this too).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
sys.path.insert(0, str(REPO / "bench"))
from classify_latency import _cpu_name  # noqa: E402

TASKS = ("classification", "summarization", "translation", "qa")
MODELS = {"tiny": "tiny", "smollm2": "smollm2-135m-instruct"}


def _register(home: Path, base: Path, task: str, seed: int) -> str:
    """A random adapter registered as ``<task>-bench`` with a training config for ``task`` on ``base``."""
    from lorafleet.config import parse_config, registry_root
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.train.results import artifact_metadata, register_artifact

    cfg = parse_config({"name": f"{task}-bench", "model": {"name_or_path": str(base)}, "task": {"name": task}},
                       "bench", home=home)
    adapter = make_lora_adapter(base, home / "work" / task, seed=seed)
    labels = list(cfg.task.labels or []) or None
    meta = artifact_metadata(cfg, labels, test_metrics={}, trainable_params=0, wall_time_s=0, steps=0, run_dir=None)
    return register_artifact(registry_root(home), f"{task}-bench", adapter, meta)


def _score(home: Path, ref: str, engine: str, rows: int) -> dict:
    """Load/start, then score ``rows`` test rows, as `lorafleet eval` does; seconds of each and the metrics."""
    from lorafleet.config import apply_overrides, parse_config, registry_root
    from lorafleet.data import read_data_split
    from lorafleet.evaluate import evaluate_rows, open_for_eval
    from lorafleet.registry import Registry
    from lorafleet.tasks import get_task

    registry = Registry(registry_root(home))
    entry = registry.resolve(ref)
    cfg = parse_config(apply_overrides(entry.meta.config, [f"eval.engine={engine}", f"data.synthetic_sizes.test={rows}"]),
                       ref, home)
    task = get_task(cfg.task)
    test = [ex.row for ex in read_data_split(cfg.data, task, "test")]
    started = time.perf_counter()
    with open_for_eval(registry.local_path(entry), cfg) as (model, tok, _):
        loaded = time.perf_counter()
        metrics = evaluate_rows(model, tok, task, test, list(task.labels) or None)
        scored = time.perf_counter()
    return {"rows": len(test), "load_s": round(loaded - started, 2), "score_s": round(scored - loaded, 2),
            "rows_per_s": round(len(test) / (scored - started), 2),
            "rows_per_s_scoring": round(len(test) / (scored - loaded), 2), "metrics": metrics}


def _predict_vs_offline(home: Path, base: Path, ref: str, task_name: str, n_rows: int) -> dict:
    """``run_predict`` on n_rows rows, then the same rows' requests through one offline engine."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from lorafleet.base_model import load_tokenizer
    from lorafleet.config import registry_root
    from lorafleet.config.predict import PredictSettings
    from lorafleet.predict import run_predict
    from lorafleet.predict.columns import lora_rank_for, plan_columns
    from lorafleet.predict.flow import _engine_env, _engine_kwargs
    from lorafleet.predict.replica import answer_block
    from lorafleet.registry import Registry
    from lorafleet.tasks import get_task

    task = get_task(task_name)
    data = home / "work" / "predict.jsonl"
    rows = task.synthetic("test", n_rows, seed=1)
    data.write_text("".join(json.dumps({k: r[k] for k in task.fields[:-1]}) + "\n" for r in rows))
    settings = PredictSettings(adapters=[ref], data=str(data), out=str(home / "work" / "out"), replicas=1)
    result = run_predict(settings, home=home, registry_root=registry_root(home), progress=False)
    import ray

    ray.shutdown()  # predict's Ray and its replica go: the offline engine gets the machine alone
    plan = plan_columns(settings, registry_root(home), home)
    env, kwargs = _engine_env(settings, gpu=False), _engine_kwargs(plan, settings, gpu=False)
    os.environ.update(env)  # what a replica's environment holds
    entry = Registry(registry_root(home)).resolve(ref)
    items = [{"where": f"predict.jsonl:{i + 1}", "row": json.loads(line)}
             for i, line in enumerate(data.read_text().splitlines())]
    started = time.perf_counter()
    llm = LLM(model=str(base), **kwargs)
    engine_up = time.perf_counter()
    lora = {plan.columns[0].name: LoRARequest(entry.ref, 1, str(Registry(registry_root(home)).local_path(entry)))}
    answered, bad = answer_block(llm, load_tokenizer(str(base)), plan.columns, lora, settings.max_model_len, items)
    done = time.perf_counter()
    offline = len(answered) / (done - started)
    return {"task": task_name, "rows": n_rows, "max_lora_rank": lora_rank_for(plan.columns),
            "predict": {"seconds": round(result.seconds, 2), "rows_per_s": round(result.rows_per_s, 2),
                        "written": result.written},
            "offline_vllm": {"engine_start_s": round(engine_up - started, 2), "generate_s": round(done - engine_up, 2),
                             "rows_per_s": round(offline, 2), "answered": len(answered), "skipped": len(bad)},
            "ratio_predict_over_offline": round(result.rows_per_s / offline, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--rows", type=int, default=64, help="test rows per task for hf vs vllm")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated; empty: predict vs offline only")
    ap.add_argument("--predict-task", default="summarization")
    ap.add_argument("--predict-rows", type=int, default=512, help="0: skip predict vs offline vLLM")
    args = ap.parse_args()
    models = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")).resolve() / "models"
    base = models / MODELS[args.model]
    if not (base / "config.json").is_file():
        sys.exit(f"{base} not found: `make models` builds it")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lorafleet-evalbench-") as tmp:
        home = Path(tmp)
        (home / "models").mkdir()
        (home / "models" / base.name).symlink_to(base)
        base = home / "models" / base.name
        refs = {task: _register(home, base, task, seed=i + 1) for i, task in enumerate(t for t in args.tasks.split(",") if t)}
        tasks = {}
        for task, ref in refs.items():
            hf, vllm = _score(home, ref, "hf", args.rows), _score(home, ref, "vllm", args.rows)
            tasks[task] = {"hf": hf, "vllm": vllm, "same_metrics": hf["metrics"] == vllm["metrics"],
                           "vllm_over_hf_rows_per_s": round(vllm["rows_per_s"] / hf["rows_per_s"], 3),
                           "vllm_over_hf_scoring_only": round(vllm["rows_per_s_scoring"] / hf["rows_per_s_scoring"], 3)}
            print(f"{task}: {json.dumps(tasks[task])}", file=sys.stderr, flush=True)
        predict = None
        if args.predict_rows:
            ref = refs.get(args.predict_task) or _register(home, base, args.predict_task, seed=9)
            predict = _predict_vs_offline(home, base, ref, args.predict_task, args.predict_rows)
    print(json.dumps({
        "bench": "eval_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "model": args.model, "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "tasks": tasks, "predict_vs_offline": predict}, indent=1))


if __name__ == "__main__":
    main()

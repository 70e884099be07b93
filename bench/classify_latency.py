"""/v1/classify latency against one pass over the same prompt (a 1-token completion), as a ratio.

    .venv/bin/python bench/classify_latency.py [--model smollm2|tiny] [--repeats 7]

Starts ``lorafleet serve`` (as users start it; colocated ingress, vLLM CPU, fp32, LoRA on) over the
base model with two random LoRA adapters registered for classification: one with single-word
labels (billing, technical, account, shipping: 2 tokens each with EOS) and one with the issue-32
multi-word labels (neutral, sehr zufrieden, unzufrieden). Then, one request at a time, for each
label set and --repeats texts (each text new, so nothing of it is in the prefix cache):
``POST /v1/classify`` and ``POST /v1/completions`` with the very prompt classify builds
(token ids), ``max_tokens: 1`` and a fresh ``cache_salt`` (one full prompt pass, nothing reused).
Prints one JSON object: per label set the medians and their ratio (goal: <= 2), the samples, the
largest difference between the last text's served scores and ``evaluate.label_probs`` on
transformers+peft fp32 (after the server stopped), and the machine, date and load. Absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL_SETS = {"single_word": ["billing", "technical", "account", "shipping"],
              "multi_word": ["neutral", "sehr zufrieden", "unzufrieden"]}
TEXTS = ["Die Lieferung kam {n} Tage zu spät an, aber der Kundenservice war freundlich und hat mir sofort "
         "einen Gutschein geschickt.",
         "Bestellung {n}: das Paket war beschädigt und niemand hat auf meine E-Mails geantwortet, sehr ärgerlich.",
         "Ich habe {n} Euro zu viel bezahlt, die Rückerstattung kam aber schon am nächsten Tag. Danke!"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _register(home: Path, base: Path, work: Path) -> dict:
    """One random adapter per label set; returns label set -> registry entry."""
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import make_lora_adapter

    reg = Registry(home / "registry")
    names = {}
    for seed, (kind, labels) in enumerate(LABEL_SETS.items()):
        src = make_lora_adapter(base, work / f"adapter-{kind}", seed=seed)
        meta = {"task": "classification", "method": "lora", "labels": labels, "base_model": str(base), "config": {}}
        names[kind] = reg.register(f"bench-{kind.replace('_', '-')}", src, meta, promote=True)
    return names


def _serve(work: Path, home: Path, base: Path, model_id: str, port: int) -> subprocess.Popen:
    import yaml

    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "lorafleet", "route_prefix": "/", "import_path": "serve.app:build_app",
                          "logging_config": {"enable_access_log": False},
                          "args": {"model_id": model_id, "base_model": str(base), "max_loras": 2,
                                   "max_model_len": 512, "max_tokens": 64}}]}))
    log = work / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lorafleet"), "serve", str(config), "--home",
                             str(home), "--num-cpus", "4"], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    started = time.time()
    while "lorafleet serving at" not in log.read_text():
        if proc.poll() is not None or time.time() - started > 600:
            _stop(proc)
            raise SystemExit(f"lorafleet serve did not start:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _measure(url: str, tok, entries: dict, repeats: int) -> dict:
    import httpx

    from lorafleet.data import prompt_ids, target_ids
    from lorafleet.tasks import get_task

    out = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for kind, labels in LABEL_SETS.items():
            spec = replace(get_task("classification"), labels=tuple(labels))
            adapter = entries[kind].name
            samples: dict[str, list[float]] = {"classify_s": [], "completion_1_token_s": []}
            prompt_len = []
            for i in range(repeats + 1):  # the first round warms the adapter up and is not counted
                text = TEXTS[i % len(TEXTS)].format(n=1000 + i)
                prompt = prompt_ids(tok, spec.instruction({"text": text}))
                calls = {
                    "classify_s": ("/v1/classify", {"text": text, "adapter": adapter}),
                    "completion_1_token_s": ("/v1/completions", {
                        "model": adapter, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                        "cache_salt": uuid.uuid4().hex}),
                }
                order = list(calls) if i % 2 == 0 else list(calls)[::-1]  # A-B, then B-A
                for key in order:
                    path, body = calls[key]
                    start = time.perf_counter()
                    r = client.post(path, json=body)
                    elapsed = time.perf_counter() - start
                    if r.status_code != 200:
                        raise SystemExit(f"{path}: {r.status_code} {r.text[:500]}")
                    if i:
                        samples[key].append(elapsed)
                    if key == "classify_s":
                        last = (prompt, r.json()["scores"])
                if i:
                    prompt_len.append(len(prompt))
            med = {k: statistics.median(v) for k, v in samples.items()}
            out[kind] = {
                "labels": labels, "label_tokens_with_eos": [len(target_ids(tok, lab)) for lab in labels],
                "prompt_tokens": sorted(set(prompt_len)),
                "median_classify_s": round(med["classify_s"], 3),
                "median_completion_1_token_s": round(med["completion_1_token_s"], 3),
                "classify_over_completion": round(med["classify_s"] / med["completion_1_token_s"], 2),
                "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
                "_last": last,
            }
    return out


def _check_scores(base: Path, entries: dict, results: dict, tok) -> None:
    """The last classify answer of each set against evaluate.label_probs on transformers+peft (fp32)."""
    import torch
    from peft import PeftModel

    from lorafleet.base_model import load_model
    from lorafleet.evaluate import label_probs

    for kind, res in results.items():
        prompt, scores = res.pop("_last")
        model = PeftModel.from_pretrained(load_model(str(base), "float32"), str(entries[kind].path)).eval()
        with torch.no_grad():
            want = label_probs(model, tok, [prompt], res["labels"])[0].tolist()
        res["max_abs_diff_vs_label_probs"] = float(f"{max(abs(scores[lab] - w) for lab, w in zip(res['labels'], want)):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=7, help="texts per label set (medians over them)")
    parser.add_argument("--port", type=int, default=18133)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lorafleet.base_import import SMOLLM2_NAME
    from lorafleet.base_model import load_tokenizer

    models = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")) / "models"
    base = models / (SMOLLM2_NAME if args.model == "smollm2" else "tiny")
    if not (base / "config.json").is_file():
        raise SystemExit(f"no base model at {base} (`make venv` builds tiny and imports SmolLM2)")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lf-classify-bench-"))
    try:
        home = work / "home"
        entries = _register(home, base, work)
        tok = load_tokenizer(str(base))
        proc = _serve(work, home, base, args.model, args.port)
        try:
            results = _measure(f"http://127.0.0.1:{args.port}", tok, entries, args.repeats)
        finally:
            _stop(proc)
        _check_scores(base, entries, results, tok)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "repeats": args.repeats,
        "load_avg_start_end": [load_start, " ".join(f"{x:.2f}" for x in os.getloadavg())],
        "wall_s": round(time.perf_counter() - t0, 1), **results,
    }, indent=2))


if __name__ == "__main__":
    main()

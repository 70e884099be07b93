"""Serving throughput ratios, measured in one run on this machine.

    .venv/bin/python bench/serve_throughput.py [--requests 32] [--tokens 64] [--port 18123]

1. raw vLLM (offline engine, all requests submitted at once) on the base model, then spread over
   4 adapters;
2. the same requests through the lorafleet Serve app's /v1/completions at the same concurrency;
3. time to first use of a not-yet-loaded adapter vs a loaded one.

Prints ratios (absolute numbers depend on the machine and its load): endpoint/raw for both mixes,
4-adapter/base for both paths, first-use/loaded latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _raw_vllm(base: Path, adapters: list[Path], prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Tokens/s of the offline engine for all-base and 4-adapter-spread batches."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=16, max_loras=4, dtype="float32",
              max_model_len=512, enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    lrs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    llm.generate([{"prompt_token_ids": prompts[0]}], sp, lora_request=lrs[:1])  # warm up + load
    out = {}
    for mix, reqs in (("base", [None] * len(prompts)), ("spread", [lrs[i % len(lrs)] for i in range(len(prompts))])):
        if mix == "spread":  # load every adapter first: throughput, not load time
            llm.generate([{"prompt_token_ids": prompts[0]}] * len(lrs), sp, lora_request=lrs)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=reqs)
        out[mix] = len(prompts) * tokens / (time.perf_counter() - start)
    del llm
    return out


def _http(url: str, model: str, prompt: list[int], tokens: int) -> float:
    import httpx

    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=18123)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import register_random_adapter

    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    home = work / "home"
    src = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"
    shutil.copytree(src, home / "models" / "tiny")
    base = home / "models" / "tiny"
    reg = Registry(home / "registry")
    entries = [register_random_adapter(reg, f"bench-{i}", base, work, seed=i) for i in range(5)]
    tok = load_tokenizer(str(base))
    prompts = [prompt_ids(tok, f"Classify the support ticket.\nTicket: request number {i}\nLabel:\n")
               for i in range(args.requests)]

    raw = _raw_vllm(base, [e.path for e in entries[:4]], prompts, args.tokens)

    import ray
    from ray import serve

    from lorafleet.serving.app import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=str(Path("/tmp") / f"lfb-{os.getpid()}"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app({"home": str(home), "max_loras": 4, "max_tokens": max(256, args.tokens)}),
                  name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        names = [e.name for e in entries[:4]]
        _http(url, "tiny", prompts[0], 4)
        for n in names:  # load the 4 spread adapters before timing throughput
            _http(url, n, prompts[0], 4)
        served = {}
        for mix, models in (("base", ["tiny"] * len(prompts)), ("spread", [names[i % 4] for i in range(len(prompts))])):
            start = time.perf_counter()
            with ThreadPoolExecutor(len(prompts)) as pool:
                list(pool.map(lambda job: _http(url, job[0], job[1], args.tokens), zip(models, prompts)))
            served[mix] = len(prompts) * args.tokens / (time.perf_counter() - start)
        loaded = min(_http(url, names[0], prompts[1], 8) for _ in range(3))
        first = _http(url, entries[4].name, prompts[1], 8)  # bench-4: never requested before
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "requests": args.requests, "tokens_per_request": args.tokens,
        "raw_vllm_tok_s": {k: round(v, 1) for k, v in raw.items()},
        "endpoint_tok_s": {k: round(v, 1) for k, v in served.items()},
        "endpoint_over_raw": {k: round(served[k] / raw[k], 3) for k in raw},
        "spread_over_base": {"raw": round(raw["spread"] / raw["base"], 3),
                             "endpoint": round(served["spread"] / served["base"], 3)},
        "first_use_s": round(first, 3), "loaded_s": round(loaded, 3),
        "first_use_over_loaded": round(first / loaded, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

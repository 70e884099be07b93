"""Load on every route at once: N concurrent clients for S seconds against `lorafleet serve` (issue 20).

    .venv/bin/python bench/serve_load.py [--clients 64] [--seconds 60] [--tokens 16] [--out load.json]

The server is started as users start it: ``lorafleet serve`` on serve/config.yaml as shipped
(home, port and task adapters overridden), on a copy of the tiny base model, with four random
LoRA adapters registered for the four tasks (random weights: the answers are noise; what is
measured is the serving path). Each client is a closed loop (its next request once the last one
answered) cycling through seven kinds of request, starting at a different one per client, so the
base model and the adapters share engine steps all the time:

  completions on the base model, completions on an adapter, streaming chat on an adapter
  (every SSE chunk read), /v1/classify, /v1/summarize, /v1/translate, /v1/qa (with a context).

A request counts as failed if its status is not 200, its body is not what the route returns, or
the answer did not come from the adapter it asked for (completions/chat: the response's ``model``
is ``tiny:<name>@<version>``; task routes: ``adapter`` is ``<name>@<version>``). Prints p50/p99
latency per kind, requests per second, and the failures (up to 5 shown); exits 1 on any failure.
Latencies depend on the machine and its load: compare within a run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import REPO, _start, _stop, _wait_ready  # noqa: E402  (one way to start/stop the server)

ADAPTERS = {  # registry name -> task
    "tickets-lora": "classification",
    "notes-lora": "summarization",
    "zilan-lora": "translation",
    "qa-lora": "qa",
}
TICKET = "my package has not arrived and nobody answers my emails"
NOTES = "Meeting notes: Ana will ship the release on Friday; Bo fixes the login bug first."


def _kinds(tokens: int) -> list[tuple[str, str, dict, str]]:
    """(kind, path, body, the adapter that must answer: "" = the base model)."""
    gen = {"max_tokens": tokens, "temperature": 0}
    return [
        ("completions/base", "/v1/completions", {"model": "tiny", "prompt": f"Ticket: {TICKET}\n", **gen}, ""),
        ("completions/adapter", "/v1/completions",
         {"model": "tickets-lora", "prompt": f"Ticket: {TICKET}\n", **gen}, "tickets-lora"),
        ("chat-stream/adapter", "/v1/chat/completions",
         {"model": "notes-lora", "messages": [{"role": "user", "content": NOTES}], "stream": True, **gen}, "notes-lora"),
        ("classify", "/v1/classify", {"text": TICKET}, "tickets-lora"),
        ("summarize", "/v1/summarize", {"text": NOTES, "max_tokens": tokens}, "notes-lora"),
        ("translate", "/v1/translate", {"text": "the river is cold", "max_tokens": tokens}, "zilan-lora"),
        ("qa", "/v1/qa", {"question": "Who ships the release?", "context": NOTES}, "qa-lora"),
    ]


async def _one(client, kind: str, path: str, body: dict, adapter: str) -> str | None:
    """Send one request; None if it answered as it must, else why not."""
    want_model = f"tiny:{adapter}@1" if adapter else "tiny"
    if body.get("stream"):
        models, done = set(), False
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return f"{r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    models.add(json.loads(line[6:]).get("model"))
        return None if done and models == {want_model} else f"stream models {models}, done={done}"
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    got = r.json()
    if path.startswith("/v1/completions"):
        ok = got.get("model") == want_model and got["choices"][0]["text"] is not None
    else:
        ok = got.get("adapter") == f"{adapter}@1"
    return None if ok else f"answered by {got.get('model') or got.get('adapter')}, not {adapter or 'the base'}"


async def _load(url: str, clients: int, seconds: float, tokens: int) -> dict:
    import httpx

    kinds = _kinds(tokens)
    samples: dict[str, list[float]] = {k[0]: [] for k in kinds}
    failures: list[tuple[str, str]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        # Warm-up: every adapter loaded once before the clock starts.
        for kind in kinds:
            if why := await _one(client, *kind):
                raise SystemExit(f"warm-up {kind[0]} failed: {why}")
        end = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            n = i
            while time.perf_counter() < end:
                kind = kinds[n % len(kinds)]
                n += 1
                started = time.perf_counter()
                try:
                    why = await _one(client, *kind)
                except Exception as exc:  # a dropped connection, a timeout: a failure like any other
                    why = f"{type(exc).__name__}: {exc}"
                samples[kind[0]].append(time.perf_counter() - started)
                if why:
                    failures.append((kind[0], why))

        started = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return {"samples": samples, "failures": failures, "wall_s": wall}


def _pct(xs: list[float], q: int) -> float:
    """The q-th percentile (1-99) of xs."""
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=60, help="length of the measured run")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of the generating requests")
    parser.add_argument("--port", type=int, default=18125)
    parser.add_argument("--out", type=Path, help="also write the result JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lorafleet.registry import Registry
    from lorafleet.serving.testing import register_random_adapter

    work = Path(tempfile.mkdtemp(prefix="lf-load-"))
    home = work / "home"
    shutil.copytree(Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")) / "models" / "tiny",
                    home / "models" / "tiny")
    reg = Registry(home / "registry")
    for seed, (name, task) in enumerate(ADAPTERS.items()):
        register_random_adapter(reg, name, home / "models" / "tiny", work, seed=seed, task=task, promote=True)
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())  # as shipped, but:
    config["applications"][0]["args"]["tasks"] = {task: name for name, task in ADAPTERS.items()}
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    url = f"http://127.0.0.1:{args.port}"
    log = work / "lorafleet-serve.log"
    proc = _start([str(Path(sys.executable).parent / "lorafleet"), "serve", str(work / "serve.yaml"),
                   "--home", str(home), "--port", str(args.port)], log, env)
    try:
        _wait_ready(proc, log, url)
        run = asyncio.run(_load(url, args.clients, args.seconds, args.tokens))
        unhandled = "unhandled error" in log.read_text()
    finally:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    r3 = lambda x: round(x, 3)  # noqa: E731
    per_kind = {k: {"requests": len(xs), "p50_s": r3(_pct(xs, 50)), "p99_s": r3(_pct(xs, 99))}
                for k, xs in run["samples"].items()}
    total = sum(len(xs) for xs in run["samples"].values())
    result = {
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
        "clients": args.clients, "seconds": args.seconds, "max_tokens": args.tokens, "wall_s": r3(run["wall_s"]),
        "requests": total, "requests_per_s": round(total / run["wall_s"], 1), "failures": len(run["failures"]),
        "failure_examples": run["failures"][:5], "last_resort_500_logged": unhandled, "per_kind": per_kind,
    }
    print("| kind | requests | p50 s | p99 s |\n|---|---|---|---|")
    for k, v in per_kind.items():
        print(f"| {k} | {v['requests']} | {v['p50_s']:.3f} | {v['p99_s']:.3f} |")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if run["failures"] or unhandled else 0)


if __name__ == "__main__":
    main()

"""End-to-end serving in the `separate` ingress mode (an ingress deployment in front of the engine,
Ray Serve's multiplexed routing; the default for several replicas): its own cold `lorafleet serve`
start, so that test_serving.py starts one app and either module can run alone.

Runs the tests of test_serving.py whose code path differs from `colocated`: engine calls through a
deployment handle, adapter loading by multiplexed id under concurrency, readiness, errors raised
in another process, promotion. The other routes are the same code in both modes and run there only.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

# Imported test functions are collected (and run against this module's `stack`) here too.
from test_serving import (  # noqa: F401
    _client,
    _complete,
    _ids,
    reference,
    serving_stack,
    stream_to_end,
    test_healthz_open_and_models_listed,
    test_healthz_says_starting_until_the_engine_answers,
    test_a_loopback_server_opens_nothing_else_to_the_network,
    test_completions_equal_transformers_peft_in_one_mixed_batch,
    test_64_concurrent_requests_over_two_adapters_and_base,
    test_bad_inputs_get_their_status_codes,
    test_tampered_adapter_is_not_served,
    test_promotion_while_requests_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained, home, base_model):
    yield from serving_stack("separate", tmp_path_factory, trained, home, base_model)


# Last in the module: it replaces the engine replica the tests above ran against.
def test_killed_engine_replica_is_replaced_and_healthz_says_so(stack, reference):
    """Issue 20 item 4, for real: SIGKILL the only engine replica's process while a stream runs on
    it. The stream ends at once with a JSON error event and [DONE] (no hang); the ingress stays up
    and /healthz answers 503 "unhealthy" (the engine does not answer); Ray Serve starts a new
    replica; /healthz says "ok" again; `lorafleet serve` keeps serving (the application was only
    repairing); an adapter request answers token for token as before (loaded again on demand)."""
    serve_proc = psutil.Process(stack["pid"])
    replicas = [p for p in serve_proc.children(recursive=True)
                if "ServeReplica:lorafleet:LLMServer:tiny" in " ".join(p.cmdline())]
    assert len(replicas) == 1, [" ".join(p.cmdline())[:80] for p in serve_proc.children(recursive=True)]
    first = threading.Event()
    with ThreadPoolExecutor(1) as pool:  # 64 prompts x 4 choices x the 64-token cap: seconds of work
        streaming = pool.submit(stream_to_end, stack, first, max_tokens=64, prompts=64, n=4, temperature=1.0)
        assert first.wait(60), "the stream never started"
        replicas[0].kill()
        killed = time.time()
        cut = streaming.result(timeout=90)
    print(f"the stream running at the kill: {cut}")
    assert cut["status"] == 200 and cut["exception"] is None and cut["bad_lines"] == [] and cut["done"], cut
    assert [e["type"] for e in cut["errors"]] == ["engine_unavailable_error"] and cut["chunks"] < 64 * 4 * 64, cut
    seen: list = []
    with _client(stack, key=None) as c:
        while not (seen and seen[-1][0] == 200 and any(code == 503 for code, _ in seen)):
            assert time.time() - killed < 300, f"no 503 then 200 within 300 s: {seen}"
            r = c.get("/healthz", timeout=10)
            seen.append((r.status_code, r.json()))
            time.sleep(0.5)
    took = time.time() - killed
    print(f"engine replica replaced in {took:.0f} s; /healthz: {sorted(set(map(str, seen)))}")
    assert {code for code, _ in seen} == {200, 503}, seen
    assert (503, {"status": "unhealthy", "model": "tiny"}) in seen
    assert serve_proc.is_running() and serve_proc.status() != psutil.STATUS_ZOMBIE  # the CLI did not give up
    with _client(stack) as c:
        out = _complete(c, "tickets-lora", stack["prompts"][0])
    assert _ids(out, stack["tok"].eos_token_id) == reference["tickets-lora"][0]

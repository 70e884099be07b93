"""Two engine replicas behind the separate ingress, as `lorafleet serve` runs them with
`num_replicas: 2` (tiny model, CPU): adapter-affine routing (issue 21 item 5) and overload (issue 20).

* Ray Serve's multiplexed routing: requests for an adapter go to the replica that already holds it,
  and an adapter on neither replica is loaded on one. Which replica holds what is read from the
  replicas' private adapter copies, `<tmp>/lorafleet-lora-<pid>-*/<name>@<version>`
  (serving/copies.py), each folder named by its replica process's pid.
* Admission: with `limits.max_in_flight: 4` and 4 streams holding every slot, a burst of 24
  requests gets JSON 429s with Retry-After (refused, not queued; how soon is printed, not
  asserted); the server then answers as before. Clients that go away mid-stream free their slots
  at once: their requests are cancelled, not left to run out.
* A replica killed under load (issue 20): the streams it was serving end with an error event, the
  requests sent meanwhile get JSON answers, and Serve's replacement answers again.

The registry this server reads is an object store (`registry: s3://...`, issue 21): moto's S3 server
on loopback (tests/helpers.py `moto_s3`), which the replicas reach through AWS_ENDPOINT_URL like any
S3-compatible store. Each replica copies a version out of the bucket into its private cache and checks
the sha256 sums on the copy before vLLM reads it, as it does from a folder registry: an s3 adapter
answers token for token as its files do through transformers+peft, a version promoted in the bucket
while serving is what the name answers, and a tampered object is refused. (Until 2026-12-07 these
three ran on a server of their own, tests/test_serving_s3.py: one server start more for the suite.)
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from helpers import moto_s3
from lorafleet.serving.copies import CACHE_PREFIX
from test_serving import MAX_NEW, _client, _complete, _ids, serving_stack, stream_to_end

pytestmark = pytest.mark.slow

MAX_IN_FLIGHT = 4
BURST = 24
# A replica tells Serve's controller which adapters it holds, and the controller tells the ingress's
# router; until then the router does not know, and may load an adapter on a second replica. The
# routing test lets that news arrive (long-poll, well under a second here) before it counts.
PROPAGATION_S = 5
LONG = 400  # tokens: four such generations at once run for seconds on 2 cores (~90 tokens/s each)
HOLD_PROMPTS = 64  # prompts per slot-holding request in the overload test (limits.max_prompts' default)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained, home, base_model):
    import boto3

    with moto_s3():
        bucket = f"serve-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield from serving_stack("separate", tmp_path_factory, trained, home, base_model, num_replicas=2,
                                 max_tokens=LONG, limits={"max_in_flight": MAX_IN_FLIGHT},
                                 registry=f"s3://{bucket}/registry")


def _engine_replicas(stack) -> list[psutil.Process]:
    serve = psutil.Process(stack["pid"])
    return [p for p in serve.children(recursive=True)
            if "ServeReplica:lorafleet:LLMServer:tiny" in " ".join(p.cmdline())]


def _held(replicas: list[psutil.Process]) -> dict[int, set[str]]:
    """Replica pid -> the adapter versions it holds a verified copy of."""
    tmp = Path(tempfile.gettempdir())  # the replicas inherit this environment through Ray
    return {p.pid: {c.name for d in tmp.glob(f"{CACHE_PREFIX}{p.pid}-*") for c in d.iterdir()
                    if not c.name.startswith(".")} for p in replicas}


def _holders(held: dict[int, set[str]], ref: str) -> list[int]:
    return [pid for pid, names in held.items() if ref in names]


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(stack):
    replicas = _engine_replicas(stack)
    assert len(replicas) == 2, [" ".join(p.cmdline())[:80] for p in psutil.Process(stack["pid"]).children(True)]
    assert _held(replicas) == {p.pid: set() for p in replicas}  # nothing loaded before the first request

    with _client(stack) as c:
        for ref, name in (("tickets-lora@1", "tickets-lora"), ("notes-lora@1", "notes-lora")):
            # On neither replica: the first request loads it on exactly one.
            assert _complete(c, name, stack["prompts"][0])["model"] == f"tiny:{ref}"
            first = _holders(_held(replicas), ref)
            assert len(first) == 1, _held(replicas)
            time.sleep(PROPAGATION_S)
            # Then every request for it goes there: 8 requests routed without regard to adapters
            # would have loaded it on the other replica too, but for a chance of 2 in 2**8.
            for i in range(8):
                assert _complete(c, name, stack["prompts"][i % 4])["model"] == f"tiny:{ref}"
            assert _holders(_held(replicas), ref) == first, _held(replicas)
    held = _held(replicas)
    print(f"adapters per replica: {held}")
    assert set().union(*held.values()) == {"tickets-lora@1", "notes-lora@1"}


# --- served from the S3 registry ------------------------------------------------------------------


def test_an_adapter_in_the_s3_registry_answers_as_its_files_do(stack):
    from lorafleet.serving.testing import reference_greedy

    entry = stack["adapters"]["tickets-lora"]
    assert str(entry.path).startswith("s3://")
    prompt = stack["prompts"][0]
    want = reference_greedy(stack["base"], stack["registry"].local_path(entry), [prompt], MAX_NEW)[0]
    with _client(stack) as c:
        body = _complete(c, "tickets-lora", prompt)
        by_task = c.post("/v1/classify", json={"text": "my card was charged twice"})
    assert body["model"] == "tiny:tickets-lora@1" and _ids(body, stack["tok"].eos_token_id) == want
    assert by_task.status_code == 200 and by_task.json()["adapter"] == "tickets-lora@1", by_task.text


def test_a_version_promoted_in_s3_while_serving_is_what_the_name_answers(stack):
    from lorafleet.serving.testing import make_lora_adapter, reference_greedy

    reg = stack["registry"]
    prompt = stack["prompts"][1]
    eos = stack["tok"].eos_token_id
    v2 = reg.register("tickets-lora", make_lora_adapter(stack["base"], stack["work"] / "s3-v2", seed=21),
                      {"task": "classification", "method": "lora", "labels": ["billing", "technical"]})
    want = reference_greedy(stack["base"], reg.local_path(v2), [prompt], MAX_NEW)[0]
    with _client(stack) as c:
        assert _complete(c, "tickets-lora", prompt)["model"] == "tiny:tickets-lora@1"  # not live yet
        reg.promote("tickets-lora", "2")
        deadline = time.time() + 30
        while (body := _complete(c, "tickets-lora", prompt))["model"] != "tiny:tickets-lora@2":
            assert time.time() < deadline, "the promotion was not seen within 30 s"
            time.sleep(0.5)
    assert _ids(body, eos) == want
    reg.promote("tickets-lora", "1")  # the tests below use version 1


def test_a_tampered_object_in_s3_is_not_served(stack):
    import boto3

    from lorafleet.serving.testing import make_lora_adapter

    reg = stack["registry"]
    entry = reg.register("tampered-lora", make_lora_adapter(stack["base"], stack["work"] / "s3-bad", seed=5),
                         {"task": "classification", "method": "lora", "labels": []})
    bucket, _, key = str(entry.path)[len("s3://"):].partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/adapter_model.safetensors", Body=b"not the weights")
    with _client(stack) as c:
        r = c.post("/v1/completions", json={"model": "tampered-lora", "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"], r.text


# --- overload and a killed replica ---------------------------------------------------------------


def _overload_trial(stack, clients: list) -> tuple[list, list, float]:
    """MAX_IN_FLIGHT holders (HOLD_PROMPTS prompts of LONG tokens each, not streamed) take every
    slot; once /metrics counts them, BURST requests go at once on ``clients`` (built beforehand, their
    threads already waiting). Returns (the holders' answers, the burst's (status, headers, body,
    sent, answered)), and when the first holder ended."""
    held_until: list[float] = []
    go = threading.Event()

    def hold(c) -> tuple[int, dict]:
        r = c.post("/v1/completions", timeout=300, json={
            "model": "tickets-lora", "prompt": [stack["prompts"][0]] * HOLD_PROMPTS,
            "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
        held_until.append(time.time())
        return r.status_code, r.json()

    def ask(i: int) -> tuple[int, dict, dict, float, float]:
        go.wait()
        sent = time.time()
        r = clients[MAX_IN_FLIGHT + 1 + i].post("/v1/completions", json={
            "model": "tickets-lora" if i % 2 else "tiny", "prompt": stack["prompts"][i % 4],
            "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        return r.status_code, dict(r.headers), r.json(), sent, time.time()

    with ThreadPoolExecutor(MAX_IN_FLIGHT) as holding, ThreadPoolExecutor(BURST) as pool:
        burst = [pool.submit(ask, i) for i in range(BURST)]  # their threads start now, and wait
        held = [holding.submit(hold, clients[i]) for i in range(MAX_IN_FLIGHT)]
        _wait_in_flight(clients[MAX_IN_FLIGHT], MAX_IN_FLIGHT, held)  # the holders have every slot
        go.set()
        answers = [f.result(timeout=300) for f in burst]
        holds = [f.result(timeout=300) for f in held]
    return holds, answers, min(held_until)


def test_overload_is_refused_at_once_and_the_server_recovers(stack):
    """MAX_IN_FLIGHT requests hold every slot (not streamed: the ingress relays nothing meanwhile);
    once /metrics counts them in flight, a burst of BURST requests arrives. Every one answered before
    the first holder ended must be a JSON 429 with Retry-After: refused, not queued.

    A trial counts only if most of the burst was answered before the first holder ended (on a machine
    also running the other pytest worker, the holders once ended first); up to 3 trials. (An earlier
    version counted the 200s of a bare burst; the share admitted depended on how fast generations
    ended, and 14 of 24 once were. Streamed holders made the ingress's relaying the bottleneck.)"""
    # Clients first: each builds an SSL context, and 24 took 10 s on 2 busy cores.
    clients = [_client(stack) for _ in range(MAX_IN_FLIGHT + 1 + BURST)]
    try:
        for trial in range(1, 4):
            holds, answers, slots_freed = _overload_trial(stack, clients)
            for code, body in holds:  # each held its slot to the end: admitted, every sequence whole
                assert code == 200 and len(body["choices"]) == HOLD_PROMPTS, (code, str(body)[:300])
            during = [a for a in answers if a[4] < slots_freed]  # no slot was free before slots_freed
            codes = Counter(code for code, *_ in answers)
            print(f"trial {trial}: burst of {BURST} while {MAX_IN_FLIGHT} requests held every slot: {dict(codes)}; "
                  f"{len(during)} answered before the first holder ended "
                  f"({slots_freed - min(a[3] for a in answers):.1f} s after the burst began)")
            if len(during) >= BURST // 2:
                break
        else:
            raise AssertionError("in 3 trials the holders ended before most of the burst was answered")
    finally:
        for c in clients:
            c.close()
    for code, headers, body, _, _ in during:
        assert code == 429, (code, body)
        assert headers["content-type"].startswith("application/json") and headers["retry-after"] == "1"
        assert body["error"]["code"] == 429 and "in flight" in body["error"]["message"], body
    for code, _, body, _, _ in answers:
        if code == 200:  # admitted after a holder ended: a whole generation
            assert len(body["choices"][0]["token_ids"]) == LONG, body
    # Reported, not asserted (timings on a shared 2-core machine): how soon a refusal came back.
    refused = [end - sent for code, _, _, sent, end in answers if code == 429]
    print(f"seconds to a 429: median {statistics.median(refused):.3f} max {max(refused):.3f}")

    # Recovered: nothing is left in flight, so requests one after another are all admitted.
    with _client(stack) as c:
        assert c.get("/healthz").status_code == 200
        for i in range(2 * MAX_IN_FLIGHT):
            _complete(c, "tickets-lora" if i % 2 else "tiny", stack["prompts"][i % 4])


def test_clients_that_go_away_free_their_slots_at_once(stack):
    """Issue 20 item 3 through HAProxy: MAX_IN_FLIGHT streams of LONG tokens, each closed after its
    first chunk. A second later MAX_IN_FLIGHT new requests are all admitted: the slots were freed when
    the clients went, not held for the seconds those generations still had to run (then they would
    have been 429s). (The replica logs "client disconnected: request cancelled", but Ray's log
    forwarding folds and delays repeated lines, so the test does not count them.)"""
    def stream_then_leave(i: int) -> int:
        with _client(stack) as c, c.stream("POST", "/v1/completions", json={
                "model": "tickets-lora" if i % 2 else "tiny", "prompt": stack["prompts"][i % 4],
                "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk: the generation is running
            return r.status_code  # leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
        assert list(pool.map(stream_then_leave, range(MAX_IN_FLIGHT))) == [200] * MAX_IN_FLIGHT
    time.sleep(1)
    with ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:
        answers = list(pool.map(lambda i: _post(stack, i, 8), range(MAX_IN_FLIGHT)))
    assert [code for code, _ in answers] == [200] * MAX_IN_FLIGHT, answers


def _wait_in_flight(client, n: int, senders: list, timeout: float = 60) -> None:
    """Wait until the ingress's /metrics says ``n`` requests are admitted and unanswered, while the
    futures ``senders`` (the requests meant to be those) are all still waiting for their answers."""
    deadline = time.time() + timeout
    seen: list[str] = []
    while True:
        line = next((ln for ln in client.get("/metrics").text.splitlines()
                     if ln.startswith("lorafleet_requests_in_flight ")), "")
        if line == f"lorafleet_requests_in_flight {float(n)}":
            return
        seen.append(line.rpartition(" ")[2])
        answered = [f.result() for f in senders if f.done()]
        assert not answered and time.time() < deadline, \
            f"never {n} requests in flight (seen {sorted(set(seen))}); answered already: {str(answered)[:1000]}"
        time.sleep(0.05)


def _post(stack, i: int, max_tokens: int) -> tuple[int, str]:
    with _client(stack) as c:
        r = c.post("/v1/completions", json={"model": "tickets-lora" if i % 2 else "tiny",
                                            "prompt": stack["prompts"][i % 4], "max_tokens": max_tokens,
                                            "temperature": 0})
    return r.status_code, r.text[:200]



def test_a_replica_killed_under_load_fails_its_requests_with_json_and_is_replaced(stack):
    """Issue 20's replica kill, through HAProxy: three streams and one plain request for one adapter
    are running on the replica that holds it when that replica's process is SIGKILLed. Each stream
    ends at once (no hang) with a JSON error event and [DONE]; the plain request is a 503 JSON with
    Retry-After; requests sent while the replica is replaced get JSON answers; Serve starts a new
    replica. (With two replicas /healthz stays 200: the other one answers. The single replica's
    503-then-200 is tests/test_serving_separate.py's kill.)"""
    replicas = _engine_replicas(stack)
    with _client(stack) as c:  # make sure one replica holds tickets-lora (the routing test did it)
        _complete(c, "tickets-lora", stack["prompts"][0])
    time.sleep(PROPAGATION_S)
    holders = _holders(_held(replicas), "tickets-lora@1")
    assert len(holders) == 1, _held(replicas)
    victim = next(p for p in replicas if p.pid == holders[0])

    n = MAX_IN_FLIGHT - 1
    firsts = [threading.Event() for _ in range(n)]

    def plain(c) -> tuple[int, dict, dict]:
        r = c.post("/v1/completions", json={"model": "tickets-lora", "prompt": [stack["prompts"][1]] * 16,
                                            "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
        return r.status_code, dict(r.headers), r.json()

    # Clients first (each builds an SSL context: seconds on 2 busy cores, during which a stream that
    # started earlier could finish), and 16 x LONG tokens per request, so all 4 run at once for seconds.
    # (The server may finish a stream well before the client has read it: TCP buffers hold the rest.)
    clients = [_client(stack) for _ in range(n)]
    with ThreadPoolExecutor(n + 1) as pool, _client(stack) as probe, _client(stack) as other:
        streams = [pool.submit(stream_to_end, stack, ev, max_tokens=LONG, prompts=16, client=c)
                   for ev, c in zip(firsts, clients)]
        assert all(ev.wait(60) for ev in firsts), "the streams never started"
        waiting = pool.submit(plain, other)
        _wait_in_flight(probe, n + 1, [*streams, waiting])  # the plain request is on a replica too
        killed_at = time.time()
        victim.kill()
        ended = [f.result(timeout=90) for f in streams]
        code, headers, body = waiting.result(timeout=90)
    took = time.time() - killed_at
    print(f"streams after the kill (ended within {took:.1f} s): {ended}; the plain request: {code} {body}")
    assert code in (200, 503), (code, body)  # JSON either way (r.json() above)
    if code == 503:
        assert body["error"]["type"] == "engine_unavailable_error" and headers["retry-after"] == "5", body
    for s in ended:  # each ended by the server (no hang, no broken connection), every line JSON, [DONE] last
        assert s["status"] == 200 and s["exception"] is None and s["bad_lines"] == [] and s["done"], s
    cut = [s for s in ended if s["errors"]]
    assert cut, f"no stream was cut: did the kill miss them? {ended}"
    for s in cut:  # the client reads why its stream stopped, and that a retry will do
        assert [e["type"] for e in s["errors"]] == ["engine_unavailable_error"] and s["chunks"] < 16 * LONG, s
    for s in ended:
        assert s in cut or s["chunks"] >= 16 * LONG, s  # any other stream ran on the other replica, whole

    # While the replacement starts: every answer is JSON, and the service comes back.
    answers: list[tuple[float, int, str]] = []
    deadline = time.time() + 300
    with _client(stack) as c:
        while time.time() < deadline:
            health = c.get("/healthz")
            r = c.post("/v1/completions", json={"model": "tickets-lora", "prompt": stack["prompts"][1],
                                                "max_tokens": 8, "temperature": 0})
            assert r.headers["content-type"].startswith("application/json"), r.text[:300]
            answers.append((round(time.time() - killed_at, 1), health.status_code, r.status_code))
            alive = [p for p in _engine_replicas(stack) if p.pid != victim.pid]
            if r.status_code == 200 and len(alive) == 2:
                break
            time.sleep(1)
    print(f"(seconds after the kill, /healthz, completion) while replaced: {answers}")
    assert answers[-1][2] == 200 and len(alive) == 2, (answers, alive)

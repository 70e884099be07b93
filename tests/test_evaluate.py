"""evaluate.py: a registered artifact scored the way `lorafleet eval` scores it.

Acceptance of issue 31's generation budget: a summarization adapter evaluated with
`task.max_new_tokens: 128` on rows whose references are longer than 48 tokens scores its full answers;
at the old budget (48, still the default) the same answers are cut and score lower.
"""

from __future__ import annotations

import json

import pytest

# A random LoRA adapter (serving.testing.make_lora_adapter, seed 5) on the session's tiny base. Which of
# the synthetic summarization test rows it answers at length depends on the base model's weights (the
# base build differs slightly from one machine to another), so the test picks, among the first 16 rows,
# those whose complete greedy answer (ended by its own EOS) is 56 to 119 tokens long: over the old budget
# and under the new one. On 2026-12-07 two fresh builds gave answers of 64/67 and 78/130 tokens there.
SEED, CANDIDATES = 5, 16


def test_a_summarization_adapter_scores_its_full_answers_with_a_larger_budget(base_model, tmp_path, monkeypatch):
    from lorafleet.config import parse_config, registry_root
    from lorafleet.data import prompt_ids, target_ids
    from lorafleet.evaluate import evaluate_artifact, generate, load_for_eval
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.tasks import get_task
    from lorafleet.train.results import artifact_metadata, register_artifact

    monkeypatch.delenv("LORAFLEET_REGISTRY", raising=False)
    task = get_task("summarization")
    adapter = make_lora_adapter(base_model, tmp_path / "adapter", seed=SEED)
    candidates = task.synthetic("test", CANDIDATES)
    # The references are the adapter's own complete answers (greedy, room for 128 tokens): a perfect
    # score means every answer was generated whole.
    model, tok, _ = load_for_eval(adapter, str(base_model))
    generated = [a.strip() for a in generate(model, tok, [prompt_ids(tok, task.instruction(r)) for r in candidates], 128)]
    lengths = [len(target_ids(tok, a)) - 1 for a in generated]  # tokens of the answer, EOS not counted
    # Over the old budget by 8+ tokens; ended by EOS, not by the budget.
    picked = [i for i, n in enumerate(lengths) if 56 <= n < 120][:2]
    assert picked, f"no row answered with 56-119 tokens on this base: {lengths}"
    rows, answers = [candidates[i] for i in picked], [generated[i] for i in picked]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "summary": a}) + "\n" for r, a in zip(rows, answers)))

    cfg = parse_config({"name": "notes", "model": {"name_or_path": str(base_model)},
                        "task": {"name": "summarization", "max_new_tokens": 128},
                        "data": {"train": str(data), "validation": str(data), "test": str(data)}}, "t", home=tmp_path)
    meta = artifact_metadata(cfg, None, test_metrics={}, trainable_params=0, wall_time_s=0, steps=0, run_dir=None)
    ref = register_artifact(registry_root(tmp_path), "notes", adapter, meta)
    assert Registry(registry_root(tmp_path)).resolve(ref).meta.max_new_tokens == 128

    # `lorafleet eval notes@1`: the task, budget included, from the artifact's registered config.
    full = evaluate_artifact(ref, home=tmp_path)["metrics"]
    # The old budget: `--set task.max_new_tokens=null` is the task's default, 48.
    old = evaluate_artifact(ref, home=tmp_path, overrides=["task.max_new_tokens=null"])["metrics"]
    assert full["rougeL"] == pytest.approx(1.0, abs=1e-9), full  # the whole answer, token for token
    # Cut at 48 of 56+ tokens: recall below 1 (0.829 for answers of 64 and 67 tokens, 2026-12-07).
    assert old["rougeL"] < 0.95, (old, [lengths[i] for i in picked])


# --- eval.engine: vllm (issue 31 item 2) ---------------------------------------------------------------
# Fast: the engine's requests and answers on an engine that is transformers itself (helpers.HFEngine), and
# every scoring path (`lorafleet eval`, training's test split, the prompt lab) routed through it. Slow: the
# real vLLM engine on the tiny base below, and on SmolLM2 in test_smollm2.py (the acceptance's model).

TEXTS = ["my card was charged twice", "the app crashes on start", "where is my parcel"]


def test_engine_model_answers_as_transformers(base_model, tmp_path):
    from types import SimpleNamespace as NS

    from helpers import HFEngine
    from lorafleet.data import prompt_ids
    from lorafleet.evaluate import generate, label_probs, load_for_eval
    from lorafleet.offline_engine import EngineModel
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.tasks import get_task

    adapter = make_lora_adapter(base_model, tmp_path / "a", seed=3)
    engine = EngineModel(HFEngine(base_model, {"a": adapter}), NS(lora_name="a"), max_model_len=256)
    base_engine = engine.with_adapter(None)
    task = get_task("classification")
    prompts = [prompt_ids(tok := load_for_eval(None, str(base_model))[1], task.instruction({"text": t})) for t in TEXTS]
    for eng, art in ((engine, adapter), (base_engine, None)):
        model, tok, _ = load_for_eval(art, str(base_model))
        want = label_probs(model, tok, prompts, list(task.labels))
        got = label_probs(eng, tok, prompts, list(task.labels))
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5, (got, want)
        assert generate(eng, tok, prompts, 12) == generate(model, tok, prompts, 12)
    # A row's prompt and its label prefixes go to the engine once each, whichever labels share them.
    engine.llm.requests.clear()
    label_probs(engine, tok, prompts, list(task.labels))
    assert len({r[0] for r in engine.llm.requests}) == len(engine.llm.requests) > len(prompts)
    with pytest.raises(ValueError, match=r"raise eval.max_model_len"):
        EngineModel(engine.llm, None, max_model_len=len(prompts[0]) + 3).generate_ids(prompts[:1], 4)
    engine.close()
    assert engine.llm is None and base_engine.llm is not None  # only the engine's owner stops it


def test_eval_engine_vllm_routes_every_scoring_path_through_the_engine(base_model, tmp_path, monkeypatch):
    """`lorafleet eval`, training's test split and the prompt lab, with `eval.engine: vllm`, open one engine
    each (on the base, with the adapter), score through it and stop it: the same metrics as transformers."""
    from helpers import HFEngine
    from lorafleet import offline_engine
    from lorafleet.config import ConfigError, parse_config, registry_root
    from lorafleet.config.prompts import PromptTemplate
    from lorafleet.evaluate import evaluate_artifact
    from lorafleet.prompts import run_prompt_lab
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.train.results import artifact_metadata, register_artifact, score_model_dir

    monkeypatch.delenv("LORAFLEET_REGISTRY", raising=False)
    opened, closed = [], []

    class Engine(offline_engine.EngineModel):
        def close(self) -> None:
            closed.append(self)

    def fake_open(model_dir, adapter=None, **kw):
        from types import SimpleNamespace as NS

        opened.append((model_dir, adapter, kw))
        return Engine(HFEngine(model_dir, {"eval": adapter} if adapter else {}), NS(lora_name="eval") if adapter else None,
                      kw["max_model_len"])

    monkeypatch.setattr(offline_engine, "open_engine", fake_open)
    adapter = make_lora_adapter(base_model, tmp_path / "a", seed=3)
    raw = {"name": "tickets", "model": {"name_or_path": str(base_model)}, "task": {"name": "classification"},
           "data": {"synthetic_sizes": {"train": 8, "validation": 8, "test": 6}}}
    cfg = parse_config(raw, "t", home=tmp_path)
    meta = artifact_metadata(cfg, list(cfg.task.labels or []) or None, test_metrics={}, trainable_params=0,
                             wall_time_s=0, steps=0, run_dir=None)
    ref = register_artifact(registry_root(tmp_path), "tickets", adapter, meta)

    hf = evaluate_artifact(ref, home=tmp_path)
    vllm = evaluate_artifact(ref, home=tmp_path, overrides=["eval.engine=vllm", "eval.max_model_len=300"])
    assert (hf["engine"], vllm["engine"]) == ("hf", "vllm") and vllm["metrics"] == hf["metrics"]
    assert opened[-1][0] == str(base_model) and opened[-1][1] is not None and opened[-1][2]["max_model_len"] == 300
    rows = [{"text": t, "label": "billing"} for t in TEXTS]
    on_engine = parse_config({**raw, "eval": {"engine": "vllm"}}, "t", home=tmp_path)
    assert score_model_dir(adapter, on_engine, rows, None) == score_model_dir(adapter, cfg, rows, None)
    lab = [PromptTemplate(name="0-shot", k=0)]
    assert [r["value"] for r in run_prompt_lab(on_engine, lab, limit=4)] == [r["value"] for r in run_prompt_lab(cfg, lab, limit=4)]
    assert len(opened) == len(closed) == 3 and opened[-1][1] is None  # the prompt lab: the bare base

    with pytest.raises(ConfigError) as err:  # every problem at once, before anything loads
        parse_config({**raw, "name": "a b", "method": {"name": "head"}, "eval": {"engine": "vllm"}}, "t", home=tmp_path)
    assert "method 'head' is scored by its own classifier" in str(err.value) and len(err.value.problems) == 2
    with pytest.raises(ConfigError, match="task 'text' is scored by its loss"):
        parse_config({**raw, "task": {"name": "text"}, "eval": {"engine": "vllm"}}, "t", home=tmp_path)

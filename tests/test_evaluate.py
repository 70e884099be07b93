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

"""evaluate.py: a registered artifact scored the way `lorafleet eval` scores it.

Acceptance of issue 31's generation budget: a summarization adapter evaluated with
`task.max_new_tokens: 128` on rows whose references are longer than 48 tokens scores its full answers;
at the old budget (48, still the default) the same answers are cut and score lower.
"""

from __future__ import annotations

import json

import pytest

# A random LoRA adapter (serving.testing.make_lora_adapter, seed 5) on the session's tiny base answers
# these two synthetic summarization test rows (indices among the first 8) with 64 and 67 tokens, each
# ended by its own EOS: complete answers, longer than the old budget and shorter than the new one
# (measured 2026-12-07; the test checks it again below, so another base fails loudly, not vacuously).
SEED, ROWS = 5, (2, 6)


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
    rows = [task.synthetic("test", 8)[i] for i in ROWS]
    # The references are the adapter's own complete answers (greedy, room for 128 tokens): a perfect
    # score means every answer was generated whole.
    model, tok, _ = load_for_eval(adapter, str(base_model))
    answers = [a.strip() for a in generate(model, tok, [prompt_ids(tok, task.instruction(r)) for r in rows], 128)]
    lengths = [len(target_ids(tok, a)) - 1 for a in answers]  # tokens of the answer, EOS not counted
    assert all(48 < n < 120 for n in lengths), lengths  # over the old budget; ended by EOS, not by the budget
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
    # Cut at 48 of 64 and 67 tokens. Measured 0.829 (2026-12-07, these rows); the bound leaves room
    # for small changes of the base, while a budget that reached 128 scores 1.0.
    assert old["rougeL"] < 0.9, old

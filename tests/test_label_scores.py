"""/v1/classify's scoring next to vLLM (``serving/label_scores.py``), without an engine.

The engine side is exercised by the served classify tests (tests/test_serving.py,
tests/test_smollm2.py), which compare the scores with ``evaluate.label_probs``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from lorafleet.serving.label_scores import branch_points, resolve_label_logprobs, trains_lm_head


def _lp(prefix: tuple[int, ...]) -> float:
    """A made-up log P(last token | the tokens before it), different for every prefix."""
    return -0.01 * (sum((i + 1) * t for i, t in enumerate(prefix)) % 997) - 0.1


def _rows(seq: list[int], cached: int) -> list:
    """vLLM's prompt_logprobs of ``seq`` with ``cached`` prefix-cache hits: rows of cached positions
    hold garbage (uninitialized memory), as the engine leaves them."""
    rows: list = [None]
    for p in range(1, len(seq)):
        valid = p - 1 >= cached
        rows.append({seq[p] if valid else 7: SimpleNamespace(logprob=_lp(tuple(seq[: p + 1])) if valid else 99.0)})
    return rows


def test_sums_each_label_from_whichever_sequence_computed_it():
    prompt = list(range(10, 45))  # 35 tokens
    labels = [[5, 6, 2], [5, 8, 9, 2], [11, 2]]  # two labels share their first token
    branches = branch_points(prompt, labels)
    assert branches == {tuple(prompt): [5, 11], (*prompt, 5): [6, 8]}
    nexts = {q: {t: _lp((*q, t)) for t in ts} for q, ts in branches.items()}
    seqs = [prompt + ids for ids in labels]
    # The first label sequence computed everything. The second read 36 tokens (prompt + the shared 5,
    # a block boundary) from the cache: its rows for 5 and 8 are garbage, 8's comes from the branch
    # request. The third read 32: all its rows are its own.
    outputs = [(seqs[0], 0, _rows(seqs[0], 0)), (seqs[1], 36, _rows(seqs[1], 36)), (seqs[2], 32, _rows(seqs[2], 32))]
    got = resolve_label_logprobs(prompt, labels, nexts, outputs)
    want = [sum(_lp((*prompt, *ids[: k + 1])) for k in range(len(ids))) for ids in labels]
    assert got == pytest.approx(want, abs=1e-12)
    assert all(math.isfinite(g) and g < 0 for g in got)  # no garbage row (99.0) was summed


def test_rows_computed_by_a_branch_request_are_used():
    """Two labels share two tokens and the block boundary falls right after them: the label sequences
    read the whole shared part from the cache; its second token's row was computed only by the request
    for the branch point (seen on SmolLM2 with " sehr zufrieden" / " sehr unzufrieden", 94-token prompt)."""
    prompt = list(range(10, 45))  # 35 tokens
    labels = [[5, 9, 6, 2], [5, 9, 8, 2]]
    branches = branch_points(prompt, labels)
    assert branches == {tuple(prompt): [5], (*prompt, 5, 9): [6, 8]}
    nexts = {q: {t: _lp((*q, t)) for t in ts} for q, ts in branches.items()}
    branch = prompt + [5, 9]
    seqs = [prompt + ids for ids in labels]
    outputs = [(prompt, 0, _rows(prompt, 0)), (branch, 32, _rows(branch, 32))]
    outputs += [(s, 37, _rows(s, 37)) for s in seqs]
    want = [sum(_lp((*prompt, *ids[: k + 1])) for k in range(len(ids))) for ids in labels]
    assert resolve_label_logprobs(prompt, labels, nexts, outputs) == pytest.approx(want, abs=1e-12)
    with pytest.raises(RuntimeError, match="no sequence computed"):  # the branch's rows are needed
        resolve_label_logprobs(prompt, labels, nexts, outputs[:1] + outputs[2:])


def test_a_prefix_nobody_computed_is_an_error_not_a_guess():
    prompt = list(range(10, 45))
    labels = [[5, 6, 2]]
    seq = prompt + labels[0]
    with pytest.raises(RuntimeError, match="no sequence computed"):
        resolve_label_logprobs(prompt, labels, {tuple(prompt): {5: -0.5}}, [(seq, 37, _rows(seq, 37))])


def test_lm_head_adapters_are_recognized(tmp_path):
    def adapter(name: str, **config) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    assert not trains_lm_head(None)
    assert not trains_lm_head(adapter("attn", target_modules=["q_proj", "v_proj"]))
    assert trains_lm_head(adapter("head", target_modules=["q_proj", "lm_head"]))
    assert trains_lm_head(adapter("saved", target_modules="all-linear", modules_to_save=["lm_head"]))
    assert trains_lm_head(str(tmp_path / "missing"))  # unreadable: the safe path


def test_engines_route_label_scoring_like_the_openai_routes():
    """Colocated: an adapter is loaded (its refusals as the OpenAI routes give them) before the
    in-process server scores; separate: an adapter goes by Serve's multiplexing, the base to any replica."""
    import asyncio

    from lorafleet.serving.engine import HandleEngine, LocalEngine

    calls: list = []

    class Server:
        async def load_adapter(self, model_id):
            calls.append(("load", model_id))

        async def label_logprobs(self, model_id, prompt, label_ids):
            calls.append(("score", model_id))
            return [-1.0] * len(label_ids)

    local = LocalEngine(Server(), "base")
    assert asyncio.run(local.label_logprobs("base", [1], [[2], [3]])) == [-1.0, -1.0]
    assert asyncio.run(local.label_logprobs("base:a@1", [1], [[2]])) == [-1.0]
    assert calls == [("score", "base"), ("load", "base:a@1"), ("score", "base:a@1")]

    class Handle:
        def __init__(self, mux=None):
            self.mux = mux

        def options(self, multiplexed_model_id):
            return Handle(multiplexed_model_id)

        @property
        def label_logprobs(self):
            async def result(model_id):
                return [self.mux or "any"]
            return SimpleNamespace(remote=lambda model_id, prompt, label_ids: result(model_id))

    handle = HandleEngine(lambda **kw: None, Handle(), "base")
    assert asyncio.run(handle.label_logprobs("base", [1], [[2]])) == ["any"]
    assert asyncio.run(handle.label_logprobs("base:a@1", [1], [[2]])) == ["base:a@1"]

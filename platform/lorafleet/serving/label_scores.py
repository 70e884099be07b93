"""/v1/classify's label log-probabilities in about one prompt pass: runs inside the engine replica.

``log P(label | prompt)`` is the sum over the label's tokens (+ EOS) of each token's log-prob given
the prompt and the label tokens before it (``lorafleet.evaluate.label_probs``' quantity). Sent as
one next-token request per distinct label prefix, as before, it cost one full pass over the prompt
per label token (13 prefixes of a 103-token prompt for 3 multi-word labels). Here the engine gets,
in one go, the bare prompt (1 token generated, the log-probs of the labels' first tokens) and one
``prompt + label`` sequence per label with ``prompt_logprobs``, all reading vLLM's prefix cache: the
prompt's full KV blocks are computed once and shared, each label sequence computes only the
prompt's last partial block and its own tokens. (Where labels diverge after shared tokens, that
prefix is asked for its next tokens too: :func:`branch_points`.)

Why it talks to vLLM's engine client and not the OpenAI completions route: vLLM skips the prefix
cache for every request with ``prompt_logprobs`` (``SamplingParams.skip_reading_prefix_cache``) and
the route cannot turn that off; with the cache read, the rows of cached positions are never
computed (their memory is left uninitialized, so they must not be detokenized: ``detokenize=False``), and
which positions were cached is only known per sequence (``RequestOutput.num_cached_tokens``).
A per-call ``cache_salt`` keeps other calls' blocks out, so every position of every sequence is
computed by some sequence of this call, and every sequence longer than the prompt returns the rows
it computed (the prompt's own rows are never needed: its last one is the first tokens'). A label
token whose own sequence read the position before it from the cache was then computed by a
sequence sharing a full block past it (same token there: same log-prob), or that block ends right
before the token, at a prefix that is a branch point (asked for its next tokens directly).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

__all__ = ["branch_points", "label_logprobs", "resolve_label_logprobs", "trains_lm_head"]

Prefix = tuple[int, ...]


def trains_lm_head(adapter_dir: str | None) -> bool:
    """Whether a PEFT adapter has ``lm_head`` weights (``adapter_config.json``): prompt log-probs for
    it, batched with other adapters, are what the CPU plugin cannot serve (``plugin.add_lora_logits``)."""
    import json
    from pathlib import Path

    if not adapter_dir:
        return False
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return True  # unknown: take the safe path
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    return any("lm_head" in str(m) for m in [*modules, *(config.get("modules_to_save") or [])])


def branch_points(prompt: list[int], label_ids: list[list[int]]) -> dict[Prefix, list[int]]:
    """The prefixes whose next-token log-probs are asked for directly: the prompt (each label's first
    token) and every prefix after which labels diverge (" sehr zufrieden" / " sehr unzufrieden").

    A label sequence whose shared prefix ends exactly on a KV block boundary gets that prefix from
    the cache, so the row of its next token is computed by no ``prompt + label`` sequence; a
    request that ends at the prefix always computes its last position.
    """
    nexts: dict[Prefix, set[int]] = {}
    for ids in label_ids:
        for k in range(len(ids)):
            nexts.setdefault((*prompt, *ids[:k]), set()).add(ids[k])
    return {q: sorted(ts) for q, ts in nexts.items() if len(q) == len(prompt) or len(ts) > 1}


def resolve_label_logprobs(prompt: list[int], label_ids: list[list[int]], nexts: dict[Prefix, dict[int, float]],
                           outputs: list[tuple[list[int], int, list[Any]]]) -> list[float]:
    """Sum each label's token log-probs from what the engine computed.

    Args:
        prompt: The prompt's token ids.
        label_ids: Each label's token ids (EOS included).
        nexts: For each branch point (:func:`branch_points`), log P(token | prefix) of its next tokens.
        outputs: Per sequence sent with prompt log-probs (branch points, ``prompt + label``): its
            tokens, its number of prefix-cache hits, and vLLM's ``prompt_logprobs`` (entry ``p`` =
            {token id: Logprob} of token ``p``; rows of positions whose predecessor was cached are
            not valid and are skipped).
    """
    value: dict[Prefix, float] = {(*q, t): lp for q, row in nexts.items() for t, lp in row.items()}
    for seq, cached, rows in outputs:
        # Row p comes from the logits at position p-1: valid when p-1 was computed (p-1 >= cached).
        for p in range(max(1, cached + 1), len(seq)):
            value.setdefault(tuple(seq[: p + 1]), float(rows[p][seq[p]].logprob))
    scores = []
    for ids in label_ids:
        try:
            scores.append(sum(value[(*prompt, *ids[: k + 1])] for k in range(len(ids))))
        except KeyError as exc:  # cannot happen (module docstring); say so rather than guess
            raise RuntimeError(f"label tokens {ids}: no sequence computed the log-prob of prefix "
                               f"...{list(exc.args[0][-3:])}") from None
    return scores


async def label_logprobs(client: Any, prompt: list[int], label_ids: list[list[int]],
                         lora_request: Any = None) -> list[float]:
    """log P(label tokens + EOS | prompt) per label, from vLLM's ``AsyncLLM`` (``client``).

    ``lora_request`` is the adapter's ``LoRARequest`` (None: the base model). Sampling is greedy
    and the log-probs raw (the engine's ``logprobs_mode`` must stay ``raw_logprobs``, which
    ``app.llm_config_from`` enforces).
    """
    from vllm import SamplingParams

    salt = uuid.uuid4().hex
    branches = branch_points(prompt, label_ids)
    # Every request but the bare prompt returns the rows of the positions it computes (prompt_logprobs:
    # each row costs a full-vocabulary logits row; the prompt's own rows are never needed); the
    # branch points also their next tokens' log-probs (the position they end on is always computed).
    rows = {"prompt_logprobs": 0, "skip_reading_prefix_cache": False, "detokenize": False}
    jobs = [(list(q), SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ts,
                                     **(rows if len(q) > len(prompt) else {"detokenize": False})))
            for q, ts in branches.items()]
    jobs += [(prompt + ids, SamplingParams(max_tokens=1, temperature=0.0, **rows)) for ids in label_ids]

    async def run(tokens: list[int], params: Any) -> Any:
        final = None
        async for out in client.generate({"prompt_token_ids": tokens, "cache_salt": salt}, params,
                                         f"lorafleet-classify-{uuid.uuid4().hex}", lora_request=lora_request):
            final = out
        return final

    # Submitted together, so the engine schedules them in the same step(s) and shares the prompt.
    results = await asyncio.gather(*(run(tokens, params) for tokens, params in jobs))
    nexts = {}
    for (q, ts), result in zip(branches.items(), results):
        row = result.outputs[0].logprobs[0]
        nexts[q] = {t: float(row[t].logprob) for t in ts}
    computed = [(tokens, r.num_cached_tokens or 0, r.prompt_logprobs) for (tokens, _), r in zip(jobs, results)
                if r.prompt_logprobs is not None]
    return resolve_label_logprobs(prompt, label_ids, nexts, computed)

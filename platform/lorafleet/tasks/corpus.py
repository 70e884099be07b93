"""The bundled pre-training corpus for the tiny base model and its BPE tokenizer.

It holds raw, unlabelled text from every task's domain plus formatted examples of the
instruction task only. No labelled or aligned example of an evaluated task is included (no
ticket with its label, no notes with their summary, no English sentence beside its Zilan
translation, no passage with a question), so the untuned base model knows the vocabulary and
the prompt format but not the tasks. Every text is drawn from the train bucket of its task, so
no test input appears in the corpus.
"""

from __future__ import annotations

import random
from typing import Any

from lorafleet.tasks import classification, instruction, qa, summarization, translation
from lorafleet.tasks.base import CORPUS_OFFSET, Task, draw_rows

__all__ = ["pretraining_corpus"]

# Share of the corpus per kind of text; the instruction examples get the largest share because
# they carry the prompt format the base model must learn.
_MIX: dict[str, float] = {
    "tickets": 0.15,
    "notes": 0.15,
    "english": 0.15,
    "zilan": 0.15,
    "passages": 0.15,
    "instructions": 0.25,
}


def pretraining_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """`n` deterministic, shuffled raw texts for tokenizer training and base-model pre-training.

    Args:
        n: Number of texts.
        seed: Changes the texts; streams are offset from every synthetic split's seeds.

    Returns:
        A list of strings (one document each).
    """
    counts = {kind: int(n * share) for kind, share in _MIX.items()}
    counts["instructions"] += n - sum(counts.values())

    def draw(task: Task, kind: str, stream: int) -> list[dict[str, Any]]:
        # One independent stream per kind: English and Zilan sentences come from different
        # draws, so they are never translations of each other by construction.
        rng = random.Random(seed + CORPUS_OFFSET + 7919 * stream)
        return draw_rows(task.make_row, task.split_key, "train", counts[kind], rng)

    ins = instruction.TASK
    texts = (
        [r["text"] for r in draw(classification.TASK, "tickets", 1)]
        + [r["text"] for r in draw(summarization.TASK, "notes", 2)]
        + [r["text"] for r in draw(translation.TASK, "english", 3)]
        + [r["translation"] for r in draw(translation.TASK, "zilan", 4)]
        + [r["context"] for r in draw(qa.TASK, "passages", 5)]
        + [ins.instruction(r) + ins.target(r) for r in draw(ins, "instructions", 6)]
    )
    random.Random(seed + CORPUS_OFFSET).shuffle(texts)
    return texts

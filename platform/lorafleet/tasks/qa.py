"""Extractive fact questions over short generated passages.

A passage states 3-4 facts about one invented person, in random order; the question asks for
one fact and the answer is a span of the passage. Names and towns are made of random
syllables, so the model has to copy from the passage rather than recall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lorafleet.tasks.base import Task, check_lengths, exact_match_and_f1, normalize_text, squad_normalize

__all__ = ["QATask", "TASK"]

_SYLLABLES = ["ma", "ra", "to", "li", "ne", "sa", "ko", "vi", "du", "be", "fi", "lo", "pa", "re"]
_ENDINGS = ["n", "r", "s", "l", ""]
_JOBS = ["baker", "nurse", "pilot", "painter", "driver", "tailor", "singer", "doctor", "miner"]
_PETS = ["cat", "dog", "parrot", "rabbit", "goat", "turtle", "hamster"]
_FOODS = ["soup", "rice", "noodles", "pancakes", "salad", "pizza", "cheese"]
_MONTHS = ["january", "march", "may", "june", "august", "october", "december"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]

# fact kind -> (statement, question); the answer is the value of the slot named like the kind.
_FACTS: dict[str, tuple[str, str]] = {
    "town": ("{name} lives in {town}.", "Where does {name} live?"),
    "job": ("{name} works as a {job}.", "What does {name} work as?"),
    "age": ("{name} is {age} years old.", "How old is {name}?"),
    "pet": ("{name} has a pet {pet}.", "What pet does {name} have?"),
    "food": ("{name} likes to eat {food}.", "What does {name} like to eat?"),
    "month": ("{name} was born in {month}.", "In which month was {name} born?"),
    "color": ("The favourite color of {name} is {color}.",
              "What is the favourite color of {name}?"),
}


@dataclass(frozen=True)
class QATask(Task):
    """Extractive QA; metrics: exact_match, token_f1 (SQuAD normalisation)."""

    instruction_line: str = "Answer the question with a short span from the passage."  # task.instruction

    def instruction(self, row: dict[str, Any]) -> str:
        """Prompt with passage and question; ends with "Answer:\\n"."""
        return (
            f"{self.instruction_line}\n"
            f"Passage: {normalize_text(row['context'])}\n"
            f"Question: {normalize_text(row['question'])}\nAnswer:\n"
        )

    def target(self, row: dict[str, Any]) -> str:
        """The answer span."""
        return normalize_text(row["answer"])

    def split_key(self, row: dict[str, Any]) -> str:
        """Split by passage, so no test passage is ever seen in training or the corpus."""
        return str(row["context"])

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Mean exact match and token F1 after SQuAD normalisation."""
        check_lengths(predictions, rows)
        return exact_match_and_f1([(squad_normalize(prediction), squad_normalize(self.target(row)))
                                   for prediction, row in zip(predictions, rows)])

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """A passage of 3-4 shuffled facts and a question about one of them."""
        values = {
            "name": _word(rng, 2),
            "town": _word(rng, 2) + rng.choice(_ENDINGS),
            "job": rng.choice(_JOBS),
            "age": str(rng.randint(18, 80)),
            "pet": rng.choice(_PETS),
            "food": rng.choice(_FOODS),
            "month": rng.choice(_MONTHS),
            "color": rng.choice(_COLORS),
        }
        kinds = rng.sample(list(_FACTS), rng.randint(3, 4))
        asked = rng.choice(kinds)
        context = " ".join(_FACTS[kind][0].format(**values) for kind in kinds)
        return {
            "question": _FACTS[asked][1].format(**values),
            "context": context,
            "answer": values[asked],
        }


def _word(rng: random.Random, syllables: int) -> str:
    """A capitalised made-up word."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


TASK = QATask(
    name="qa",
    fields=("question", "context", "answer"),
    primary_metric="token_f1",
    mode="max",
    max_new_tokens=16,
)

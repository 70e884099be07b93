"""Generic instruction following: small algorithmic requests, or the user's chat rows.

Deliberately unlike the four evaluated tasks: its examples go into the pre-training corpus to
teach the base model the prompt format ("...\\nAnswer:\\n" then a short answer) without
teaching it any evaluated task.

A row is either {instruction, response} or a chat row {messages: [{role, content}, ...]} (an
optional system turn first, user/assistant turns after, the last one the assistant's). A chat row
is rendered with the tokenizer's chat template; training puts the loss on every assistant turn
(`lorafleet.data.chat_ids`), scoring compares the last assistant turn with the model's answer to
the turns before it.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from lorafleet.tasks.base import Task, check_lengths, exact_match_and_f1, normalize_text

__all__ = ["InstructionTask", "TASK"]

_WORDS = [
    "sun", "moon", "lamp", "rock", "star", "milk", "rain", "door", "bell", "kite", "leaf",
    "road", "ship", "gold", "wind", "frog", "hill", "cake", "rose", "bear", "wolf", "nest",
    "coin", "desk", "drum", "fork", "hat", "jam", "key", "lion", "map", "nut", "owl", "pen",
    "ring", "sock", "tent", "vase", "web", "yarn", "box", "cup", "egg", "fan", "gate", "ink",
    "jar", "lake", "mud", "net", "oak", "pig", "rug", "sand", "toy", "van", "wax", "zebra",
]
_OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("day", "night"), ("open", "closed"), ("wet", "dry"),
    ("early", "late"), ("full", "empty"), ("light", "dark"), ("hard", "soft"), ("rich", "poor"),
    ("left", "right"), ("in", "out"), ("win", "lose"), ("high", "low"), ("thick", "thin"),
    ("push", "pull"), ("first", "last"), ("loud", "silent"), ("near", "far"), ("buy", "sell"),
]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _repeat(rng: random.Random) -> tuple[str, str]:
    word, times = rng.choice(_WORDS), rng.choice([(2, "twice"), (3, "three times")])
    return f"Repeat the word {word} {times[1]}.", " ".join([word] * times[0])


def _opposite(rng: random.Random) -> tuple[str, str]:
    pair = rng.choice(_OPPOSITES)
    if rng.random() < 0.5:
        pair = (pair[1], pair[0])
    return f"Give the opposite of {pair[0]}.", pair[1]


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(1, 40)
    stop = start + rng.randint(2, 5)
    return f"Count from {start} to {stop}.", " ".join(str(i) for i in range(start, stop + 1))


def _backwards(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Spell {word} backwards.", word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"Write {word} in capital letters.", word.upper()


def _first_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"What is the first letter of {word}?", word[0]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"Add {a} and {b}.", str(a + b)


def _number_word(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 9)
    return f"Write the number {n} as a word.", _NUMBER_WORDS[n]


def _sort(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Sort these words: {' '.join(words)}.", " ".join(sorted(words))


def _join(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_WORDS, 2)
    return f"Join {a} and {b} with a dash.", f"{a}-{b}"


_MAKERS: list[Callable[[random.Random], tuple[str, str]]] = [
    _repeat, _opposite, _count, _backwards, _uppercase, _first_letter, _add, _number_word,
    _sort, _join,
]


class InstructionTask(Task):
    """Free-form instructions; metrics: exact_match, token_f1 (case-sensitive tokens).

    Unlike QA, answers are compared case-sensitively and without dropping articles, because
    "Write cat in capital letters." and "Repeat the word a twice." depend on both.
    """

    def instruction(self, row: dict[str, Any]) -> str | list[dict[str, str]]:
        """The instruction, ending with "Answer:\\n"; for a chat row, its turns before the last answer."""
        if "messages" in row:
            return [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]
        return f"{normalize_text(row['instruction'])}\nAnswer:\n"

    def target(self, row: dict[str, Any]) -> str:
        """The response (a chat row's last assistant turn)."""
        if "messages" in row:
            return normalize_text(row["messages"][-1]["content"])
        return normalize_text(row["response"])

    def validate_row(self, row: dict[str, Any]) -> str | None:
        """{instruction, response}, or {messages}: role/content turns, users and assistants, the last an answer."""
        if isinstance(row, dict) and "messages" in row:
            return _chat_problem(row["messages"])
        return super().validate_row(row)

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Mean exact match and whitespace-token F1 (trailing period ignored)."""
        check_lengths(predictions, rows)
        return exact_match_and_f1([(normalize_text(prediction).rstrip("."), self.target(row).rstrip("."))
                                   for prediction, row in zip(predictions, rows)])

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """One request from a random small algorithmic family."""
        instruction, response = rng.choice(_MAKERS)(rng)
        return {"instruction": instruction, "response": response}


def _chat_problem(messages: Any) -> str | None:
    """None for a usable chat, else what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {role, content} turns"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or not turn["content"].strip():
            return f"messages[{i}] must be an object with a non-empty string 'content'"
        if turn.get("role") not in _ROLES:
            return f"messages[{i}] has role {turn.get('role')!r}; use one of {list(_ROLES)}"
        if turn["role"] == "system" and i != 0:
            return f"messages[{i}] is a system turn; only the first turn may be"
    if messages[-1]["role"] != "assistant":
        return "the last turn must be the assistant's (the answer to train on and score)"
    if not any(turn["role"] == "user" for turn in messages):
        return "a chat needs at least one user turn"
    return None


_ROLES = ("system", "user", "assistant")

TASK = InstructionTask(
    name="instruction",
    fields=("instruction", "response"),
    primary_metric="token_f1",
    mode="max",
    max_new_tokens=24,
)

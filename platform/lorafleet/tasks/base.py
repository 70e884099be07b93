"""The task contract shared by training, evaluation and serving.

A task knows four things: how a row becomes a prompt (`instruction`), what the model must
produce (`target`), how predictions are scored (`score`), and how to make synthetic rows
(`synthetic`). Everything else (tokenisation, loss masks, generation) lives elsewhere and
codes against this module only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "Task",
    "render_prompt",
    "render_chat",
    "normalize_text",
    "squad_normalize",
    "token_f1",
    "exact_match_and_f1",
    "check_lengths",
    "draw_rows",
    "split_bucket",
    "SPLITS",
    "SPLIT_OFFSETS",
    "CORPUS_OFFSET",
    "DEFAULT_SIZES",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Large, prime-ish offsets so that `seed + offset` streams of different splits never coincide
# for any small user seed.
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "validation": 1_000_003, "test": 2_000_003}
CORPUS_OFFSET = 3_000_017
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Task:
    """A task's prompt contract, target format, metrics and synthetic data.

    Prompt/target convention (every task follows it):
      * ``instruction(row)`` is plain text without a chat template and ends with a newline,
        e.g. ``"...\\nLabel:\\n"``.
      * ``target(row)`` has no leading or trailing whitespace and no EOS token.
      * The training/serving text is exactly ``render_prompt(tokenizer, instruction(row))
        + target(row)`` (+ EOS, added by the caller); no separator is inserted. Ending the
        prompt on a newline keeps the prompt/target boundary on a token boundary for byte-level
        BPE (a trailing space would be merged into the target's first token).

    Attributes:
        name: Task name, one of `TASK_NAMES`.
        fields: Row fields the task needs (after field mapping).
        primary_metric: The key of `score()`'s result that model selection optimises.
        mode: "max" or "min" for the primary metric.
        max_new_tokens: Generation budget for this task's targets.
        labels: The closed label set (classification only).
    """

    name: str
    fields: tuple[str, ...]
    primary_metric: str
    mode: str
    max_new_tokens: int
    labels: tuple[str, ...] = ()

    # --- the contract -----------------------------------------------------------------------
    def instruction(self, row: dict[str, Any]) -> str:
        """The prompt text for `row` (no chat template); ends with a newline."""
        raise NotImplementedError

    def target(self, row: dict[str, Any]) -> str:
        """The text the model must produce for `row` (no EOS, no surrounding whitespace)."""
        raise NotImplementedError

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """All metrics of `predictions` against `rows`, each in [0, 1]."""
        raise NotImplementedError

    # --- synthetic data ---------------------------------------------------------------------
    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """One random synthetic row drawn from `rng` (subclasses implement)."""
        raise NotImplementedError

    def split_key(self, row: dict[str, Any]) -> str:
        """The text whose hash assigns a synthetic row to a split (the model input)."""
        return str(row[self.fields[0]])

    def synthetic(self, split: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Deterministic synthetic rows for `split`.

        Args:
            split: "train", "validation" or "test".
            n: Number of rows; defaults to 2000 for train and 200 otherwise.
            seed: Changes the rows; the same (split, n, seed) always gives the same rows.

        Returns:
            A list of row dicts. Splits never share an input: each input is hashed into one
            split bucket, and a split only keeps inputs from its own bucket.
        """
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        n = DEFAULT_SIZES[split] if n is None else n
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(seed + SPLIT_OFFSETS[split])
        return draw_rows(self.make_row, self.split_key, split, n, rng)

    # --- validation -------------------------------------------------------------------------
    def validate_row(self, row: dict[str, Any]) -> str | None:
        """None if `row` is usable by this task, else a short description of the problem."""
        if not isinstance(row, dict):
            kind = type(row).__name__
            return f"row is a {kind}, expected an object with fields {list(self.fields)}"
        for field in self.fields:
            if field not in row or row[field] is None:
                return f"missing field {field!r}"
            value = row[field]
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                return f"field {field!r} must be a string, got {type(value).__name__}"
            if not str(value).strip():
                return f"field {field!r} is empty"
        return None


def render_prompt(tokenizer: Any, instruction: str | list[dict[str, str]]) -> str:
    """The prompt contract: wrap `instruction` in the tokenizer's chat template if it has one.

    Args:
        tokenizer: A Hugging Face tokenizer (or anything with `chat_template` and
            `apply_chat_template`).
        instruction: The task's instruction text, or a chat row's turns before the answer
            (`[{role, content}, ...]`, as `InstructionTask.instruction` gives for chat rows).

    Returns:
        The chat-templated user turn (or turns) with the generation prompt appended, or
        `instruction` unchanged when the tokenizer has no chat template.
    """
    if isinstance(instruction, list):
        return render_chat(tokenizer, instruction, generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
    return instruction


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """Chat turns through the tokenizer's chat template; without one, as "role: content" lines
    (with "assistant:" appended for a generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:\n" if generation_prompt else "")


# --- text helpers shared by the task modules ------------------------------------------------
def normalize_text(text: str) -> str:
    """Strip and collapse runs of whitespace to one space."""
    return _WS.sub(" ", str(text)).strip()


_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation and articles, fix whitespace."""
    text = _PUNCT.sub(" ", str(text).lower())
    return normalize_text(_ARTICLES.sub(" ", text))


def token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    """Bag-of-tokens F1 (the SQuAD definition); two empty answers count as a match."""
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    remaining = list(gold_tokens)
    common = 0
    for token in prediction_tokens:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_and_f1(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean exact match and whitespace-token F1 over normalised (prediction, gold) pairs."""
    if not pairs:
        return {"exact_match": 0.0, "token_f1": 0.0}
    em = sum(float(pred == gold) for pred, gold in pairs)
    f1 = sum(token_f1(pred.split(), gold.split()) for pred, gold in pairs)
    return {"exact_match": em / len(pairs), "token_f1": f1 / len(pairs)}


def check_lengths(predictions: list[str], rows: list[dict[str, Any]]) -> None:
    """Raise if predictions and rows cannot be paired."""
    if len(predictions) != len(rows):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(rows)} rows; pass one per row"
        )


def split_bucket(key: str) -> str:
    """The split an input belongs to: a stable hash, 80% train, 10% validation, 10% test."""
    # sha256 rather than hash(): Python's str hash is salted per process.
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def draw_rows(
    make_row: Callable[[random.Random], dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    bucket: str,
    n: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Draw `n` rows from `make_row` whose `key` hashes into `bucket`.

    Rows are kept unique while the generator can supply new ones; once 1000 draws in a row
    were all repeats, the language is treated as exhausted and repeats are allowed, so any
    `n` can be served.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeats = 0
    while len(rows) < n:
        row = make_row(rng)
        if split_bucket(key(row)) != bucket:
            continue
        ident = json.dumps(row, sort_keys=True)
        if ident in seen and repeats < 1000:
            repeats += 1
            continue
        repeats = 0 if ident not in seen else repeats
        seen.add(ident)
        rows.append(row)
    return rows

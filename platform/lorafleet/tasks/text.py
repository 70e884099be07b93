"""'text': plain language modelling on raw text (loss on every token), used to pre-train the tiny base."""

from __future__ import annotations

from typing import Any

from lorafleet.tasks.base import Task

__all__ = ["TextTask", "TEXT"]


class TextTask(Task):
    def instruction(self, row: dict[str, Any]) -> str:
        return ""

    def target(self, row: dict[str, Any]) -> str:
        return str(row["text"]).strip()

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError("the 'text' task is scored by its loss (lorafleet.evaluate.lm_loss)")

    def synthetic(self, split: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        from lorafleet.tasks.corpus import pretraining_corpus

        offset = {"train": 0, "validation": 1, "test": 2}[split]
        return [{"text": t} for t in pretraining_corpus(n or 4000, seed=seed * 10 + offset)]


TEXT = TextTask(name="text", fields=("text",), primary_metric="loss", mode="min", max_new_tokens=0)

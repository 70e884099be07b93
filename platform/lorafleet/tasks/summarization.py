"""Meeting notes -> a one-line summary of the decisions and action items.

Notes mix small talk with one or two decisions phrased in a few ways; the summary restates
only the decisions, each in one fixed short form, in the order they were made. The model must
learn to drop the small talk and rewrite the decision phrasing.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from lorafleet.tasks.base import Task, check_lengths, normalize_text

__all__ = ["SummarizationTask", "TASK"]

_PEOPLE = ["Ana", "Bo", "Cai", "Dev", "Eli", "Finn", "Gus", "Ida", "Jon", "Kim", "Lea", "Max"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
_EVENTS = ["launch", "demo", "review", "release", "offsite", "workshop"]
_BUGS = ["login", "search", "upload", "export", "signup", "checkout"]
_DOCS = ["release notes", "budget plan", "test plan", "user guide", "roadmap"]
_CLIENTS = ["Acme", "Globex", "Initech", "Hooli", "Vandelay"]
_COUNTS = ["two", "three", "four"]

# (note phrasings, summary form) per decision kind.
_DECISIONS: list[tuple[list[str], str]] = [
    (
        ["We agreed to move the {event} to {day}.", "The {event} will move to {day}.",
         "After some debate the {event} moved to {day}."],
        "{Event} moves to {day}.",
    ),
    (
        ["{p} will fix the {bug} bug.", "{p} offered to fix the {bug} bug.",
         "The {bug} bug goes to {p} to fix."],
        "{p} fixes the {bug} bug.",
    ),
    (
        ["{p} will write the {doc}.", "{p} agreed to draft the {doc}.",
         "The {doc} will be written by {p}."],
        "{p} writes the {doc}.",
    ),
    (
        ["{p} will call {client} about the contract.", "{p} is going to phone {client} soon.",
         "Someone must call {client}, and {p} took it."],
        "{p} calls {client}.",
    ),
    (
        ["We decided to hire {count} new engineers.", "The team agreed to hire {count} engineers.",
         "Hiring {count} engineers was approved."],
        "Team hires {count} engineers.",
    ),
]
_SMALL_TALK = [
    "{p} brought cake for everyone.",
    "{p} talked about the weekend.",
    "The meeting started a few minutes late.",
    "{p} shared photos from a trip.",
    "Everyone liked the new coffee machine.",
    "{p} asked about the weather.",
    "The room was too cold again.",
    "{p} joined from home today.",
    "We spent a while on holiday plans.",
    "{p} said hello to the new intern.",
]


@functools.cache
def _scorer() -> Any:
    """One ROUGE scorer, built on first use: rouge_score loads nltk and absl (~2 s), which
    `import lorafleet.tasks` (the CLI, configs, serving's task map) must not pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


@dataclass(frozen=True)
class SummarizationTask(Task):
    """Meeting notes -> decisions; metrics: rouge1, rouge2, rougeL (F-measure)."""

    instruction_line: str = "Summarize the decisions in the meeting notes in one line."  # task.instruction

    def instruction(self, row: dict[str, Any]) -> str:
        """Prompt with the notes; ends with "Summary:\\n"."""
        return f"{self.instruction_line}\nNotes: {normalize_text(row['text'])}\nSummary:\n"

    def target(self, row: dict[str, Any]) -> str:
        """The one-line summary."""
        return normalize_text(row["summary"])

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Mean ROUGE-1/2/L F-measures (with stemming)."""
        check_lengths(predictions, rows)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for prediction, row in zip(predictions, rows):
            scores = _scorer().score(self.target(row), normalize_text(prediction))
            for key in totals:
                totals[key] += scores[key].fmeasure
        return {key: value / len(rows) if rows else 0.0 for key, value in totals.items()}

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """Notes of 3-5 sentences with 1-2 decisions at random positions."""
        n_sentences = rng.randint(3, 5)
        kinds = rng.sample(range(len(_DECISIONS)), rng.randint(1, 2))
        people = rng.sample(_PEOPLE, 4)
        decisions: list[tuple[str, str]] = []
        for i, kind in enumerate(kinds):
            phrasings, summary = _DECISIONS[kind]
            event = rng.choice(_EVENTS)
            slots = {
                "p": people[i], "event": event, "Event": event.capitalize(),
                "day": rng.choice(_DAYS), "bug": rng.choice(_BUGS), "doc": rng.choice(_DOCS),
                "client": rng.choice(_CLIENTS), "count": rng.choice(_COUNTS),
            }
            decisions.append((rng.choice(phrasings).format(**slots), summary.format(**slots)))
        talk = [
            s.format(p=rng.choice(people[2:]))
            for s in rng.sample(_SMALL_TALK, n_sentences - len(decisions))
        ]
        # Decisions keep their relative order (the summary follows it); small talk fills in.
        slots_for_decisions = sorted(rng.sample(range(n_sentences), len(decisions)))
        sentences: list[str] = []
        for position in range(n_sentences):
            if position in slots_for_decisions:
                sentences.append(decisions[slots_for_decisions.index(position)][0])
            else:
                sentences.append(talk.pop())
        return {"text": " ".join(sentences), "summary": " ".join(s for _, s in decisions)}


TASK = SummarizationTask(
    name="summarization",
    fields=("text", "summary"),
    primary_metric="rougeL",
    mode="max",
    max_new_tokens=48,
)

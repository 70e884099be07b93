"""Support-ticket routing: a ticket's text -> one of four queues.

The synthetic language makes the label a function of a few keywords ("invoice", "crashes",
"password", "parcel"), so a fine-tuned tiny model can clearly reach >= 0.9 accuracy, while the
fillers around them are shared by all labels and carry no signal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lorafleet.tasks.base import Task, check_lengths, normalize_text

__all__ = ["ClassificationTask", "TASK", "LABELS"]

LABELS: tuple[str, ...] = ("billing", "technical", "account", "shipping")

_PERIODS = ["this month", "last month", "march", "april", "june", "this week"]
_SCREENS = ["settings", "dashboard", "reports", "calendar", "search", "export"]
_WHEN = ["yesterday", "last week", "this morning", "two days ago", "on monday", "after lunch"]

# Each label's problems use its own keywords; none of them appear in another label's list.
_PROBLEMS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {period} invoice",
        "my refund has not arrived yet",
        "the payment on my credit card failed",
        "I need a receipt for my {period} payment",
        "why did my subscription fee go up {period}",
        "I was overcharged on my {period} bill",
        "please remove the extra charge on my invoice",
        "the discount was not applied to my bill",
    ],
    "technical": [
        "the app crashes when I open the {screen} page",
        "I get an error message on the {screen} page",
        "the {screen} page will not load",
        "the website freezes after the update",
        "sync fails on my phone {when}",
        "there is a bug in the {screen} page",
        "the app is very slow since the update",
        "notifications stopped working {when}",
    ],
    "account": [
        "I forgot my password and cannot log in",
        "please reset my password",
        "I want to change the email on my account",
        "my account is locked {when}",
        "the login code never reaches my phone",
        "how do I delete my account",
        "I cannot change my username",
        "someone else signed in to my account {when}",
    ],
    "shipping": [
        "my package has not arrived",
        "the tracking number does not work",
        "the parcel arrived damaged {when}",
        "the courier left my parcel at the wrong address",
        "when will my delivery arrive",
        "my package is stuck in transit",
        "I received the wrong item in the parcel",
        "the delivery is late by {days} days",
    ],
}
_GREETINGS = ["hi,", "hello,", "hey team,", "good morning,", "dear support,", ""]
_FILLERS = [
    "",
    "it started {when}.",
    "this is the second time.",
    "I have been a customer for years.",
    "this is urgent.",
    "my customer id is {num}.",
    "I tried again {when}.",
]
_CLOSERS = ["please help", "thanks", "can you look into it?", "any ideas?", "thank you!", ""]


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Text classification into a closed label set; metrics: accuracy, macro_f1.

    `labels` are lowercase and whitespace-normalised; a label may be several words (several
    tokens): training, scoring and serving all compare the whole label. `instruction_line` may
    name the labels with "{labels}" (`task.instruction` in the config).
    """

    instruction_line: str = "Classify the support ticket into one of: {labels}."

    def instruction(self, row: dict[str, Any]) -> str:
        """Prompt listing the labels; ends with "Label:\\n"."""
        line = self.instruction_line.replace("{labels}", ", ".join(self.labels))
        return f"{line}\nTicket: {normalize_text(row['text'])}\nLabel:\n"

    def target(self, row: dict[str, Any]) -> str:
        """The label, lowercased."""
        return normalize_text(row["label"]).lower()

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Accuracy and macro-F1.

        Macro-F1 averages per-label F1 over the labels present in the gold labels or in the
        (valid) predictions, as sklearn's `f1_score(average="macro")` does; a prediction
        that is not a label counts as a miss for its gold label.
        """
        check_lengths(predictions, rows)
        if not rows:
            return {"accuracy": 0.0, "macro_f1": 0.0}
        gold = [self.target(row) for row in rows]
        pred = [self.parse_label(p) for p in predictions]
        accuracy = sum(p == g for p, g in zip(pred, gold)) / len(gold)
        present = [lab for lab in self.labels if lab in gold or lab in pred]
        f1s = []
        for lab in present:
            tp = sum(p == lab and g == lab for p, g in zip(pred, gold))
            fp = sum(p == lab and g != lab for p, g in zip(pred, gold))
            fn = sum(p != lab and g == lab for p, g in zip(pred, gold))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}

    def parse_label(self, prediction: str) -> str | None:
        """The label a prediction names (case-insensitive, trailing punctuation ignored)."""
        text = normalize_text(prediction).lower().rstrip(".!,;:")
        return text if text in self.labels else None

    def validate_row(self, row: dict[str, Any]) -> str | None:
        """Base checks plus: the label is one of `labels` (any label passes while the set is open, `()`)."""
        problem = super().validate_row(row)
        if problem is None and self.labels and self.target(row) not in self.labels:
            return f"label {row['label']!r} not in labels {list(self.labels)}"
        return problem

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """A ticket: greeting + one label-keyed problem + neutral filler + closer."""
        label = rng.choice(LABELS)
        slots = {
            "period": rng.choice(_PERIODS),
            "screen": rng.choice(_SCREENS),
            "when": rng.choice(_WHEN),
            "days": str(rng.randint(2, 9)),
            "num": str(rng.randint(1000, 9999)),
        }
        problem = rng.choice(_PROBLEMS[label]).format(**slots)
        closer = rng.choice(_CLOSERS)
        sentence = f"{problem}, {closer}" if closer else problem
        if sentence[-1] not in ".?!":
            sentence += "."
        filler = rng.choice(_FILLERS).format(**slots)
        # The filler goes before or after the problem, so position carries no signal.
        parts = [filler, sentence] if rng.random() < 0.5 else [sentence, filler]
        text = normalize_text(" ".join([rng.choice(_GREETINGS), *parts]))
        return {"text": text, "label": label}


TASK = ClassificationTask(
    name="classification",
    fields=("text", "label"),
    primary_metric="accuracy",
    mode="max",
    max_new_tokens=8,
    labels=LABELS,
)

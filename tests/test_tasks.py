"""Tests for lorafleet.tasks: prompt contract, metrics, synthetic data and the corpus."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from lorafleet.tasks import SERVED_TASKS, TASK_NAMES, TASK_ROUTES, Task, get_task, pretraining_corpus, render_prompt
from lorafleet.tasks import translation

SPLITS = ("train", "validation", "test")
# The model input of each task: the field whose hash picks a row's split.
INPUT_FIELD = {
    "classification": "text",
    "summarization": "text",
    "translation": "text",
    "qa": "context",
    "instruction": "instruction",
}
# Clearly wrong predictions per task (what an untuned model might babble).
WRONG = {
    "summarization": "The weather was nice and everyone went home.",
    "translation": "hello world.",
    "qa": "banana",
    "instruction": "banana",
}


@pytest.fixture(scope="module", params=TASK_NAMES)
def task(request: pytest.FixtureRequest) -> Task:
    return get_task(request.param)


def test_task_names_and_unknown_name() -> None:
    assert TASK_NAMES == ("classification", "summarization", "translation", "qa", "instruction")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*'classification'.*'instruction'"):
        get_task("nope")


def test_served_tasks_and_their_routes() -> None:
    assert TASK_ROUTES == {"classification": "/v1/classify", "summarization": "/v1/summarize",
                           "translation": "/v1/translate", "qa": "/v1/qa"}
    assert SERVED_TASKS == tuple(TASK_ROUTES) and set(SERVED_TASKS) < set(TASK_NAMES)
    # `lorafleet ask` and the demo send the text under the task's first field: the request's field name.
    assert {name: get_task(name).fields[0] for name in SERVED_TASKS} == {
        "classification": "text", "summarization": "text", "translation": "text", "qa": "question"}


def test_importing_tasks_loads_no_metric_stack() -> None:
    """Configs, the CLI and serving read task names and routes from here: that must not cost the
    metric stacks' import (rouge_score pulls nltk and absl, ~2 s); they load when a task scores."""
    code = ("import sys, lorafleet.tasks; "
            "print(sorted(m for m in ('nltk', 'rouge_score', 'sacrebleu', 'absl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_task_attributes(task: Task) -> None:
    assert task.mode == "max"
    assert task.max_new_tokens > 0
    assert INPUT_FIELD[task.name] in task.fields
    assert task.primary_metric in task.score([], []) or task.name == "classification"
    assert (task.labels != ()) == (task.name == "classification")


def test_get_task_applies_the_configured_budget() -> None:
    """A config's task.max_new_tokens replaces the task's own budget (what evaluation, validation, the
    prompt lab and serving generate up to); without it the defaults stay as they were."""
    from lorafleet.config import TaskConfig

    assert {name: get_task(name).max_new_tokens for name in ("qa", "instruction", "summarization", "translation")} \
        == {"qa": 16, "instruction": 24, "summarization": 48, "translation": 48}
    assert get_task(TaskConfig(name="summarization", max_new_tokens=128)).max_new_tokens == 128
    assert get_task(TaskConfig(name="qa", instruction="Answer briefly.", max_new_tokens=5)).max_new_tokens == 5
    assert get_task(TaskConfig(name="translation")).max_new_tokens == 48


def test_synthetic_is_deterministic(task: Task) -> None:
    assert task.synthetic("train", n=50, seed=3) == task.synthetic("train", n=50, seed=3)
    assert task.synthetic("train", n=50, seed=3) != task.synthetic("train", n=50, seed=4)
    assert task.synthetic("test", n=50) == task.synthetic("test", n=50, seed=0)


def test_default_sizes_and_bad_split(task: Task) -> None:
    assert [len(task.synthetic(s)) for s in SPLITS] == [2000, 200, 200]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.synthetic("dev")


def test_splits_share_no_inputs(task: Task) -> None:
    field = INPUT_FIELD[task.name]
    inputs = {s: {row[field] for row in task.synthetic(s, seed=s_seed)}
              for s, s_seed in zip(SPLITS, (0, 1, 2))}
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]
    # Different seeds of the same split are still disjoint from other splits.
    assert not {r[field] for r in task.synthetic("train", seed=7)} & inputs["test"]


def test_rows_valid_and_contract(task: Task) -> None:
    for row in task.synthetic("train", n=300) + task.synthetic("test"):
        assert task.validate_row(row) is None, row
        instruction, target = task.instruction(row), task.target(row)
        # The convention: prompt ends with a newline, target is bare, caller concatenates.
        assert instruction.endswith(":\n"), instruction
        assert target and target == target.strip(), target
        assert len(instruction + target) < 400, instruction + target
        assert all(isinstance(row[f], str) for f in task.fields)


def test_validate_row_catches_problems(task: Task) -> None:
    row = task.synthetic("train", n=1)[0]
    for field in task.fields:
        missing = {k: v for k, v in row.items() if k != field}
        assert task.validate_row(missing) == f"missing field {field!r}"
        assert task.validate_row({**row, field: "  "}) == f"field {field!r} is empty"
    assert "must be a string" in task.validate_row({**row, task.fields[0]: ["x"]})
    assert "expected an object" in task.validate_row(["not", "a", "dict"])


def test_classification_bad_label() -> None:
    task = get_task("classification")
    problem = task.validate_row({"text": "my parcel is late", "label": "foo"})
    assert problem == "label 'foo' not in labels ['billing', 'technical', 'account', 'shipping']"
    # Case and surrounding spaces are normalised, as for predictions.
    assert task.validate_row({"text": "my parcel is late", "label": " Shipping "}) is None


def test_perfect_predictions_score_one(task: Task) -> None:
    rows = task.synthetic("test", n=60)
    scores = task.score([task.target(r) for r in rows], rows)
    assert scores[task.primary_metric] == pytest.approx(1.0)
    for value in scores.values():
        assert 0.0 <= value <= 1.0
    # Whitespace noise around a correct answer is normalised away.
    noisy = task.score(["  " + task.target(r).replace(" ", "  ") + "\n" for r in rows], rows)
    assert noisy[task.primary_metric] == pytest.approx(1.0)


def test_wrong_predictions_score_low(task: Task) -> None:
    rows = task.synthetic("test", n=60)
    if task.name == "classification":
        # A constant label is right on about a quarter of the rows only.
        wrong = ["billing"] * len(rows)
        limit = 0.4
    else:
        wrong = [WRONG[task.name]] * len(rows)
        limit = 0.2
    scores = task.score(wrong, rows)
    assert scores[task.primary_metric] < limit, scores
    # Echoing the model input back is not a good answer either.
    echoed = task.score([r[INPUT_FIELD[task.name]] for r in rows], rows)
    assert echoed[task.primary_metric] < 0.5, echoed


def test_score_rejects_length_mismatch(task: Task) -> None:
    rows = task.synthetic("test", n=3)
    with pytest.raises(ValueError, match="2 predictions for 3 rows"):
        task.score(["a", "b"], rows)


def test_classification_metrics_golden() -> None:
    task = get_task("classification")
    rows = [{"text": "t", "label": lab} for lab in ("billing", "billing", "technical", "account")]
    preds = ["Billing", "technical.", " technical ", "shipping"]
    scores = task.score(preds, rows)
    # Hand-computed: billing P=1 R=1/2 F1=2/3; technical P=1/2 R=1 F1=2/3; account F1=0;
    # shipping (predicted only) F1=0 -> macro = (2/3 + 2/3) / 4 = 1/3. Accuracy 2/4.
    # sklearn.metrics.f1_score(gold, pred, average="macro") gives the same 1/3.
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["macro_f1"] == pytest.approx(1 / 3, abs=1e-9)
    # A prediction that is not a label is a miss, not a crash.
    assert task.score(["no idea"], rows[:1]) == {"accuracy": 0.0, "macro_f1": 0.0}


def test_classification_macro_f1_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    task = get_task("classification")
    rows = task.synthetic("test", n=80)
    labels = list(task.labels)
    # Deterministically wrong on every third row: shift to the next label.
    preds = [labels[(labels.index(r["label"]) + (i % 3 == 0)) % 4] for i, r in enumerate(rows)]
    gold = [r["label"] for r in rows]
    expected = metrics.f1_score(gold, preds, average="macro")
    assert task.score(preds, rows)["macro_f1"] == pytest.approx(expected, abs=1e-9)


def test_classification_labels_follow_keywords() -> None:
    # The label must be learnable: every ticket contains one of its label's keywords.
    keywords = {
        "billing": ("invoice", "refund", "payment", "receipt", "fee", "bill", "charge"),
        "technical": ("crash", "error", "load", "freez", "sync", "bug", "slow", "notification"),
        "account": ("password", "account", "login", "username", "signed in"),
        "shipping": ("package", "tracking", "parcel", "courier", "delivery"),
    }
    for row in get_task("classification").synthetic("train", n=500):
        assert any(k in row["text"] for k in keywords[row["label"]]), row


def test_qa_answer_is_span_of_context() -> None:
    for row in get_task("qa").synthetic("train", n=200):
        assert row["answer"] in row["context"]


def test_qa_squad_normalisation() -> None:
    task = get_task("qa")
    row = {"question": "Where?", "context": "Mara lives in the Old Mill.", "answer": "the Old Mill"}
    assert task.score(["old mill."], [row]) == {"exact_match": 1.0, "token_f1": 1.0}
    # One of two gold tokens: P=1, R=1/2 -> F1 = 2/3.
    assert task.score(["mill"], [row])["token_f1"] == pytest.approx(2 / 3)


def test_instruction_is_case_sensitive() -> None:
    task = get_task("instruction")
    row = {"instruction": "Write cat in capital letters.", "response": "CAT"}
    assert task.score(["cat"], [row])["exact_match"] == 0.0
    assert task.score(["CAT."], [row])["exact_match"] == 1.0


def test_translation_rules() -> None:
    assert translation.translate("the big dogs see a cat.") == "ka domek bir vasi na fel."
    assert translation.translate("a horse is happy.") == "na kavo lo jolu."
    # Every synthetic pair follows the documented rules.
    for row in get_task("translation").synthetic("train", n=300):
        assert translation.translate(row["text"]) == row["translation"], row
    assert len(translation.DICTIONARY) >= 55


class _NoTemplate:
    chat_template = None


class _Template:
    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_render_prompt() -> None:
    assert render_prompt(_NoTemplate(), "Add 1 and 2.\nAnswer:\n") == "Add 1 and 2.\nAnswer:\n"
    assert render_prompt(object(), "x\n") == "x\n"
    tok = _Template()
    assert render_prompt(tok, "hi\n") == "<user>hi\n</user><assistant>"
    assert tok.calls == [
        ([{"role": "user", "content": "hi\n"}], {"add_generation_prompt": True, "tokenize": False})
    ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretraining_corpus()


def test_corpus_deterministic_and_sized(corpus: list[str]) -> None:
    assert len(corpus) == 4000
    assert corpus == pretraining_corpus()
    assert corpus != pretraining_corpus(seed=1)
    assert len(pretraining_corpus(n=100)) == 100
    assert all(isinstance(t, str) and t.strip() for t in corpus)


def test_corpus_has_every_domain(corpus: list[str]) -> None:
    text = "\n".join(corpus)
    assert "Answer:\n" in text  # formatted instruction examples
    assert re.search(r"\bka \w+", text)  # Zilan sentences
    assert "the meeting started" in text.lower()  # meeting notes
    assert "years old" in text  # QA passages
    assert "tracking number" in text  # tickets


def test_corpus_has_no_labelled_examples(corpus: list[str]) -> None:
    zilan_words = set(translation.DICTIONARY.values())
    zilan_words |= {w + translation.PLURAL_SUFFIX for w in translation.NOUNS.values()}
    english_words = set(translation.DICTIONARY) | {w + "s" for w in translation.NOUNS}
    for text in corpus:
        for marker in ("Label:", "Summary:", "Question:", "English:", "Zilan:", "Ticket:"):
            assert marker not in text, text
        # Lowercase words only: invented QA names ("Kolo") may spell a Zilan word.
        words = set(re.findall(r"\b[a-z]+\b", text))
        if words & zilan_words - english_words:
            # A text with Zilan in it is pure Zilan: no English sentence beside its translation.
            assert words <= zilan_words, text
    # No test-split input of any task appears in the corpus.
    texts = set(corpus)
    for name in TASK_NAMES:
        task = get_task(name)
        for row in task.synthetic("test"):
            assert row[INPUT_FIELD[name]] not in texts
            assert task.instruction(row) + task.target(row) not in texts

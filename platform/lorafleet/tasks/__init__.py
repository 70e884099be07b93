"""Tasks: the prompt contract, target format, metrics and synthetic data of each task.

Also the one list of task names (`TASK_NAMES`) and of the served ones with their routes
(`TASK_ROUTES`, `SERVED_TASKS`), which configs, serving, the CLI and the demo read. Importing this
package loads no metric stack (rouge_score/nltk, sacrebleu load when a task first scores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lorafleet.tasks import classification, instruction, qa, summarization, translation
from lorafleet.tasks.base import Task, normalize_text, render_prompt
from lorafleet.tasks.corpus import pretraining_corpus
from lorafleet.tasks.text import TEXT

__all__ = ["Task", "get_task", "TASK_NAMES", "GENERATING_TASKS", "SERVED_TASKS", "TASK_ROUTES", "render_prompt",
           "pretraining_corpus"]

_TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK
    for module in (classification, summarization, translation, qa, instruction)
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
# 'text' (plain language modelling) is internal: it pre-trains the tiny base model.
_TASKS[TEXT.name] = TEXT
# The tasks whose answer is generated, so a generation budget (`max_new_tokens`) applies to them;
# classification picks the likeliest label instead, and 'text' only pre-trains.
GENERATING_TASKS: tuple[str, ...] = tuple(name for name in TASK_NAMES if name != "classification")

# Task -> its serving endpoint, whose request names the text after the task's first field
# (`Task.fields[0]`: text, or question for qa). 'instruction' has none.
TASK_ROUTES: dict[str, str] = {
    "classification": "/v1/classify",
    "summarization": "/v1/summarize",
    "translation": "/v1/translate",
    "qa": "/v1/qa",
}
SERVED_TASKS: tuple[str, ...] = tuple(TASK_ROUTES)


def get_task(spec: Any) -> Task:
    """The task called `spec`, or the task a config's `task:` section describes, configured.

    Args:
        spec: A task name, or a `TaskConfig` (anything with `name`, `labels`, `source_lang`,
            `target_lang`, `instruction`, `max_new_tokens`): its settings replace the task's defaults
            (labels lowercased and whitespace-normalised, as targets are).

    Raises:
        ValueError: the name is not a task; the message lists the valid names.
    """
    name = spec if isinstance(spec, str) else spec.name
    try:
        task = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {list(TASK_NAMES)} (and 'text' for pre-training)") from None
    return task if isinstance(spec, str) else _configured(task, spec)


def _configured(task: Task, spec: Any) -> Task:
    """`task` with the config's settings; settings a task has no field for are left out (the config
    schema refuses them for the wrong task)."""
    fields = {f.name for f in dataclasses.fields(task)}
    changes: dict[str, Any] = {}
    if getattr(spec, "labels", None) and "labels" in fields and task.labels:
        changes["labels"] = tuple(normalize_text(lab).lower() for lab in spec.labels)
    for key, field in (("source_lang", "source_lang"), ("target_lang", "target_lang"),
                       ("instruction", "instruction_line")):
        value = getattr(spec, key, None)
        if value and field in fields:
            changes[field] = normalize_text(value)
    budget = getattr(spec, "max_new_tokens", None)
    if budget and task.name in GENERATING_TASKS:
        changes["max_new_tokens"] = int(budget)
    return dataclasses.replace(task, **changes) if changes else task

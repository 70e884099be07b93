"""Tasks: the prompt contract, target format, metrics and synthetic data of each task."""

from __future__ import annotations

import dataclasses
from typing import Any

from lorafleet.tasks import classification, instruction, qa, summarization, translation
from lorafleet.tasks.base import Task, normalize_text, render_prompt
from lorafleet.tasks.corpus import pretraining_corpus
from lorafleet.tasks.text import TEXT

__all__ = ["Task", "get_task", "TASK_NAMES", "render_prompt", "pretraining_corpus"]

_TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK
    for module in (classification, summarization, translation, qa, instruction)
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
# 'text' (plain language modelling) is internal: it pre-trains the tiny base model.
_TASKS[TEXT.name] = TEXT


def get_task(spec: Any) -> Task:
    """The task called `spec`, or the task a config's `task:` section describes, configured.

    Args:
        spec: A task name, or a `TaskConfig` (anything with `name`, `labels`, `source_lang`,
            `target_lang`, `instruction`): its settings replace the task's defaults (labels
            lowercased and whitespace-normalised, as targets are).

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
    return dataclasses.replace(task, **changes) if changes else task

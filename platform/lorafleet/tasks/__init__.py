"""Tasks: the prompt contract, target format, metrics and synthetic data of each task."""

from __future__ import annotations

from lorafleet.tasks import classification, instruction, qa, summarization, translation
from lorafleet.tasks.base import Task, render_prompt
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


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        ValueError: `name` is not a task; the message lists the valid names.
    """
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {list(TASK_NAMES)} (and 'text' for pre-training)") from None

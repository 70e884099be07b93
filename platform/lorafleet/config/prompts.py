"""The prompt lab's schema: a prompt template (instruction wording, k in-context examples), as listed
under a compare config's `prompts` or given with `lorafleet prompts --template`, and the check of
templates against a task's fields (every problem at once, before any model loads)."""

from __future__ import annotations

import string

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorafleet.tasks import Task

__all__ = ["PromptTemplate", "template_problems"]


class PromptTemplate(BaseModel):
    """One query format to try: an instruction wording and a number of in-context examples."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short label shown in the results table.")
    instruction: str | None = Field(
        None,
        description="Format string over the row's input fields (e.g. '{text}') and '{labels}' "
        "(the comma-separated label set); must end with a newline. Default: the task's own prompt.",
    )
    k: int = Field(0, ge=0, le=64, description="In-context examples (train rows) before the query.")

    @model_validator(mode="after")
    def _newline(self) -> "PromptTemplate":
        if self.instruction is not None and not self.instruction.endswith("\n"):
            raise ValueError(
                f"template {self.name!r}: the instruction must end with a newline (the prompt contract: "
                f"the answer starts on the next line); got ...{self.instruction[-20:]!r}"
            )
        return self



def _answer_field(task: Task) -> str:
    """The row field that holds the answer (the one `task.target` reads)."""
    row = task.synthetic("train", 1, seed=0)[0]
    for name in task.fields:
        if str(row[name]).strip().lower() == task.target(row).strip().lower():
            return name
    return task.fields[-1]


def template_problems(templates: list[PromptTemplate], task: Task) -> list[str]:
    """Every problem with `templates` for `task` (unknown or answer-leaking placeholders)."""
    answer = _answer_field(task)
    allowed = [f for f in task.fields if f != answer] + (["labels"] if task.labels else [])
    problems = []
    for t in templates:
        if t.instruction is None:
            continue
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(t.instruction) if n is not None}
        except ValueError as err:
            problems.append(f"template {t.name!r}: not a valid format string ({err}); write literal braces as {{{{ }}}}")
            continue
        for n in sorted(names):
            if n == answer:
                problems.append(f"template {t.name!r} uses {{{n}}}, the answer itself; use only {allowed}")
            elif n not in allowed:
                problems.append(f"template {t.name!r}: unknown placeholder {{{n}}}; task {task.name!r} rows offer {allowed}")
    names = [t.name for t in templates]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"template names must be unique; repeated: {dupes}")
    return problems

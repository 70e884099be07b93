"""The rows of a predict run: read like training reads them (`lorafleet.data.iter_source`: the same
sources and file:line names; the same `data.fields` mapping), but a bad row is reported and skipped
instead of stopping the run.

`lorafleet.data.read_split` stops at the first bad row on purpose (a run must not train on part of
its data); batch inference keeps every other row's result. Only a row's *input* fields are needed
(the task's fields but its target, which predict produces).
"""

from __future__ import annotations

from typing import Any

from lorafleet.data import DataError, Example, iter_source
from lorafleet.tasks import Task

__all__ = ["BadRow", "read_rows", "input_fields", "blocks"]

BadRow = tuple[str, str]  # (where, problem), e.g. ("data.jsonl:17", "missing field 'text'")


def input_fields(task: Task) -> tuple[str, ...]:
    """The fields a prompt is built from: the task's fields but the last (the target)."""
    return task.fields[:-1]


def read_rows(source: str, tasks: list[Task], *, fields: dict[str, str] | None = None,
              split: str = "test") -> tuple[list[Example], list[BadRow]]:
    """Every usable row of ``source`` and every bad one with its problem, in file order.

    Args:
        source: A local or s3:// / gs:// .jsonl/.csv/.parquet file, or hf:<id>[:<split>].
        tasks: The tasks whose prompts the rows feed (each column's); a row must fit all of them.
        fields: task field -> column mapping (``data.fields``).
        split: The split of an hf: dataset id without one.

    Raises:
        DataError: the source itself cannot be read (missing, unsupported type), or holds no usable row.
    """
    mapping = fields or {}
    good: list[Example] = []
    bad: list[BadRow] = []
    for where, raw, problem in iter_source(source, split):
        row = dict(raw) if raw is not None else {}
        for field, column in mapping.items():
            if column in row:
                row[field] = row[column]
        problem = problem or next((p for p in (_input_problem(t, row) for t in tasks) if p), None)
        if problem:
            hint = f" (field mapping: {mapping})" if mapping and raw is not None else ""
            bad.append((where, problem + hint))
        else:
            good.append(Example(row, where))
    if not good:
        raise DataError(f"{source}: no usable row" + (f"; the first problem: {bad[0][0]}: {bad[0][1]}" if bad else ""))
    return good, bad


def blocks(n_rows: int, block_rows: int) -> list[range]:
    """Row index ranges of the blocks, in order: block ``i`` holds rows ``i*block_rows`` onwards."""
    return [range(start, min(start + block_rows, n_rows)) for start in range(0, n_rows, block_rows)]


def _input_problem(task: Task, row: dict[str, Any]) -> str | None:
    """The problem of a row as `task`'s prompt input (the checks of `Task.validate_row` on its input fields)."""
    if task.name == "instruction" and "messages" in row:
        return task.validate_row(row)  # a chat row: its turns are checked as training checks them
    for field in input_fields(task):
        value = row.get(field)
        if value is None:
            return f"missing field {field!r}"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            return f"field {field!r} must be a string, got {type(value).__name__}"
        if not str(value).strip():
            return f"field {field!r} is empty"
    return None

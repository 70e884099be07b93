"""The rows of a predict run: read like training reads them (same sources, `data.fields` mapping,
file:line names), but a bad row is reported and skipped instead of stopping the run.

`lorafleet.data.read_split` stops at the first bad row on purpose (a run must not train on part of
its data); batch inference keeps every other row's result. Only a row's *input* fields are needed
(the task's fields but its target, which predict produces).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafleet.data import DataError, Example
from lorafleet.tasks import Task
from lorafleet.uri import download, is_uri

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
    for where, raw, problem in _iter_source(source, split):
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


Item = tuple[str, "dict[str, Any] | None", "str | None"]  # (where, row or None, its problem)


def _iter_source(source: str, split: str) -> Iterator[Item]:
    if source.startswith("hf:"):
        yield from _iter_hub(source, split)
        return
    if is_uri(source):
        try:
            local = download(source)
        except FileNotFoundError:
            raise DataError(f"data file not found: {source}") from None
        try:
            yield from list(_iter_file(local, source))
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    yield from _iter_file(path, str(path))


def _iter_file(path: Path, name: str) -> Iterator[Item]:
    """Rows of a local file; a line that is not a row is yielded with its problem (file:line names
    as `lorafleet.data` gives them)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{name}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    yield where, None, f"not valid JSON ({err.msg})"
                    continue
                yield (where, obj, None) if isinstance(obj, dict) else \
                    (where, None, f"expected a JSON object, got {type(obj).__name__}")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for obj in reader:
                where = f"{name}:{reader.line_num}"  # line numbers count the header
                yield (where, None, "more cells than the header has columns") if None in obj else (where, obj, None)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield f"{name}:row {i + 1}", obj, None
    else:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def _iter_hub(spec: str, split: str) -> Iterator[Item]:
    """A `datasets` source as training reads it: a saved folder, a hub id, or a folder of data files."""
    import datasets

    dataset_id, _, hub_split = spec.partition(":")[2].partition(":")
    if (Path(dataset_id) / "state.json").is_file() or (Path(dataset_id) / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(dataset_id)
        ds = ds[hub_split or split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(dataset_id, split=hub_split or split)
    for i, obj in enumerate(ds):
        yield f"{spec} row {i + 1}", dict(obj), None

"""Reading task rows (synthetic, JSONL/CSV/Parquet, or a `datasets` hub id), validating them with
file:line errors, and encoding prompt + target into token ids with the loss on answer tokens only.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from lorafleet.tasks import Task, render_prompt
from lorafleet.tasks.base import render_chat
from lorafleet.tasks.formats import read_format
from lorafleet.uri import download, is_uri

if TYPE_CHECKING:
    from lorafleet.config import DataConfig

__all__ = ["DataError", "Example", "iter_source", "read_split", "read_data_split", "prompt_ids", "target_ids", "chat_ids", "encode_rows", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # labels with this value carry no loss (the prompt tokens)


class DataError(ValueError):
    """A data problem, naming the file and line (or row) where it was found."""


@dataclass(frozen=True)
class Example:
    """One row plus where it came from, so any later problem can name file and line."""

    row: dict[str, Any]
    where: str  # "data/train.jsonl:17", "synthetic:train:3", "hf:imdb:train row 5"


Item = tuple[str, "dict[str, Any] | None", "str | None"]  # (where, the row or None, the line's problem or None)


def iter_source(source: str, split: str, *, missing: str = "data file not found") -> Iterator[Item]:
    """The rows of a data file (local, or an s3:// / gs:// object, downloaded first and named by its
    URI) or of an `hf:` source, in order: ``(where, row, None)``, or ``(where, None, problem)`` for a line
    that is not a row (not JSON, not an object, more CSV cells than columns). The caller decides what a
    bad line does: `read_split` stops there (a run must not train on part of its data), batch inference
    skips it (`lorafleet.predict.rows`).

    Raises:
        DataError: the source cannot be read at all (``missing``: the message's start when it does not
            exist; an unsupported file type).
    """
    if source.startswith("hf:"):
        yield from _iter_hub(source, split)
        return
    if is_uri(source):
        try:
            local = download(source)
        except FileNotFoundError:
            raise DataError(f"{missing}: {source}") from None
        try:
            yield from list(_iter_file(local, source))  # read whole before the download goes
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{missing}: {path}")
    yield from _iter_file(path, str(path))


def _iter_file(path: Path, name: str) -> Iterator[Item]:
    """Rows of a local file, each named "<name>:<line>" (``name``: what to report, e.g. the s3:// URI a
    downloaded file came from)."""
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
                # a row with extra cells has a None key
                yield (where, None, "more cells than the header has columns") if None in obj else (where, obj, None)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield f"{name}:row {i + 1}", obj, None
    else:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def _iter_hub(spec: str, split: str) -> Iterator[Item]:
    import datasets

    _, _, rest = spec.partition(":")
    dataset_id, _, hub_split = rest.partition(":")
    if (Path(dataset_id) / "state.json").is_file() or (Path(dataset_id) / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(dataset_id)  # a Dataset(Dict).save_to_disk folder: no network
        ds = ds[hub_split or split] if isinstance(ds, datasets.DatasetDict) else ds
    else:  # a hub id, or a local folder of data files (parquet, csv, json) that load_dataset reads
        ds = datasets.load_dataset(dataset_id, split=hub_split or split)
    for i, obj in enumerate(ds):
        yield f"{spec} row {i + 1}", dict(obj), None


def read_split(
    source: str,
    task: Task,
    split: str,
    *,
    fields: dict[str, str] | None = None,
    synthetic_n: int | None = None,
    seed: int = 0,
    data_format: str = "auto",
) -> list[Example]:
    """Read and validate one split. Raises DataError naming the first bad row's file and line.

    Args:
        source: 'synthetic', a local or s3:// / gs:// .jsonl/.csv/.parquet file (an object is
            downloaded first; errors name its URI and line), or 'hf:<dataset_id>[:<split>]'.
        task: the task whose fields the rows must carry.
        split: 'train', 'validation' or 'test' (picks the synthetic generator's split).
        fields: task field -> column name mapping for user data.
        data_format: instruction rows' format (`data.format`, `lorafleet.tasks.formats`): 'auto' (by each
            row's fields), 'messages', 'sharegpt' or 'alpaca'; rows are read into the task's own shape.
    """
    if data_format != "auto" and task.name != "instruction":
        raise ValueError(f"data format {data_format!r} is for task 'instruction', not {task.name!r}")
    if source == "synthetic":
        rows = task.synthetic(split, synthetic_n, seed=seed)
        items: Iterator[Item] = ((f"synthetic:{task.name}:{split}:{i}", r, None) for i, r in enumerate(rows))
    else:
        items = iter_source(source, split, missing=f"{split} data file not found")

    mapping = fields or {}
    out = []
    for where, raw, bad_line in items:
        if bad_line:
            raise DataError(f"{where}: {bad_line}")
        row = dict(raw)
        for field, column in mapping.items():
            if column in raw:
                row[field] = raw[column]
        problem = None
        if task.name == "instruction":  # synthetic rows are in the task's own shape whatever data.format says
            row, problem = read_format(row, "auto" if source == "synthetic" else data_format)
        problem = problem or task.validate_row(row)
        if problem:
            hint = f" (field mapping: {mapping})" if mapping else ""
            raise DataError(f"{where}: {problem}{hint}")
        out.append(Example(row, where))
    if not out:
        raise DataError(f"{source}: the {split} split has no rows")
    return out


def read_data_split(data: DataConfig, task: Task, split: str) -> list[Example]:
    """One split as a run's `data:` section names it (the source, field mapping, synthetic size and seed): how training, evaluation and the sweep all read data."""
    return read_split(getattr(data, split), task, split, fields=data.fields,
                      synthetic_n=data.synthetic_sizes.get(split), seed=data.seed, data_format=data.format)


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of a prompt under the task's prompt contract (chat template when there is one).

    A rendered chat template already carries the model's BOS if it wants one, so special tokens are
    only added for plain prompts. Serving tokenizes prompts exactly like this.
    """
    text = render_prompt(tokenizer, instruction)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    return tokenizer(text, add_special_tokens=not has_template)["input_ids"]


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target, EOS appended.

    Prompts end with a newline and the target follows with one leading space: byte-level BPE
    vocabularies hold words in their space-prefixed form ("Ġshipping"), so " shipping" is one or two
    tokens where "shipping" would be four rare pieces. Decoded answers are stripped.
    """
    return tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat row rendered with the chat template: the loss on every assistant
    turn only (its text and end-of-turn marker as the template writes them; EOS after the last).

    Each assistant turn is cut where the generation prompt of the turns before it ends, the point where
    serving and evaluation start generating (`prompt_ids` of those turns)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text already tokenized
    answer: list[int] = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], generation_prompt=True)
        after = render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "chat rows need one that does")
        context = tokenizer(before[len(done):], add_special_tokens=not has_template and not done)["input_ids"]
        answer = tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = after
    if tokenizer.eos_token_id not in answer:  # the template's end of turn may already be EOS (SmolLM2)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def encode_rows(
    tokenizer, task: Task, examples: list[Example], max_seq_len: int, *, head_labels: list[str] | None = None,
    truncate: Literal["error", "left", "right"] = "error",
) -> list[dict[str, list[int]]]:
    """Encode examples as input_ids + labels (prompt tokens masked with IGNORE_INDEX).

    With `head_labels`, encode for a classification head instead: the prompt only, plus the label's index.

    Args:
        truncate: What an example longer than `max_seq_len` becomes (`data.truncate`): "error" (a
            DataError naming its row), "left" (its last `max_seq_len` tokens: the start of the prompt
            goes, the answer stays) or "right" (its first `max_seq_len` tokens: the end of the answer
            may go). A row that truncation leaves without a single answer token is a DataError, never a
            row that trains on nothing.
    """
    if truncate not in ("error", "left", "right"):
        raise ValueError(f"truncate must be 'error', 'left' or 'right', got {truncate!r}")
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        if task.name == "text":
            prompt: list[int] = []
            target = tokenizer(ex.row["text"], add_special_tokens=False)["input_ids"] + [eos]
        elif "messages" in ex.row:  # a chat row (instruction task): the loss on all assistant turns
            prompt, target = [], []
            chat, chat_labels = chat_ids(tokenizer, ex.row["messages"])
        else:
            prompt = prompt_ids(tokenizer, task.instruction(ex.row))
            target = target_ids(tokenizer, task.target(ex.row))
        if head_labels is not None:
            ids, labels = prompt, [head_labels.index(task.target(ex.row).strip())]
        elif "messages" in ex.row and task.name != "text":
            ids, labels = chat, chat_labels
        else:
            ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        if len(ids) > max_seq_len:
            ids, labels = _truncated(ids, labels, max_seq_len, truncate, ex.where, per_token=head_labels is None)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _truncated(ids: list[int], labels: list[int], max_seq_len: int, truncate: str, where: str, *,
               per_token: bool) -> tuple[list[int], list[int]]:
    """An over-long example cut to `max_seq_len` as `truncate` says (`encode_rows`); `labels` are cut
    with the ids when they are per token (not a head's label index)."""
    over = f"{where}: {len(ids)} tokens, over data.max_seq_len={max_seq_len}"
    if truncate == "error":
        raise DataError(f"{over}; shorten the row or raise data.max_seq_len, or set data.truncate to 'left' or 'right'")
    keep = slice(len(ids) - max_seq_len, None) if truncate == "left" else slice(None, max_seq_len)
    ids = ids[keep]
    if per_token:
        labels = labels[keep]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{over}; data.truncate='{truncate}' leaves none of its answer tokens: use "
                            "data.truncate 'left' or raise data.max_seq_len")
    return ids, labels

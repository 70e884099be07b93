"""Instruction data formats (`data.format`): the OpenAI `messages` shape, ShareGPT and Alpaca rows, each
read into one of the instruction task's own shapes ({messages: [{role, content}]} or {instruction, response}).

* messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (kept as is).
* sharegpt: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system"?: ...}``
  (``user``/``assistant`` accepted for ``from``; a top-level ``system`` string becomes the first turn).
* alpaca: ``{"instruction": ..., "input"?: ..., "output": ..., "system"?: ...}``: the input follows the
  instruction after a blank line, as Alpaca's template puts it, and the row becomes a user turn and the
  assistant's answer (read as a chat, so the input's line breaks survive; LLaMA-Factory reads it the same way).
* auto: each row by its fields (messages, conversations, instruction + output, instruction + response).

A row that is not of the expected shape is a problem string naming what was expected; the caller adds
the file and line (`lorafleet.data.read_split`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATA_FORMATS", "read_format"]

DATA_FORMATS: tuple[str, ...] = ("auto", "messages", "sharegpt", "alpaca")

_SHAPES = {
    "messages": "{messages: [{role, content}, ...]}",
    "sharegpt": "{conversations: [{from, value}, ...]}",
    "alpaca": "{instruction, input?, output}",
}
# ShareGPT's speaker names (and the OpenAI ones some ShareGPT exports use) -> chat roles
_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_format(row: dict[str, Any], data_format: str) -> tuple[dict[str, Any] | None, str | None]:
    """`row` read as `data_format` (see the module doc): (the row in the instruction task's shape, None),
    or (None, what is wrong with it)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; use one of {list(DATA_FORMATS)}")
    if data_format == "auto":
        if "messages" in row:
            return row, None
        if "conversations" in row:
            return _sharegpt(row)
        if "instruction" in row and "output" in row:
            return _alpaca(row)
        if "instruction" in row and "response" in row:
            return row, None
        return None, (f"no known instruction row shape among its fields {sorted(row)}; expected "
                      + ", ".join(f"{shape} ({name})" for name, shape in _SHAPES.items())
                      + " or {instruction, response}")
    if data_format == "messages":
        if "messages" in row:
            return row, None
        return None, _wrong_shape(row, "messages")
    return (_sharegpt if data_format == "sharegpt" else _alpaca)(row)


def _wrong_shape(row: dict[str, Any], data_format: str) -> str:
    return f"expected {_SHAPES[data_format]} (data.format: {data_format}), got fields {sorted(row)}"


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _sharegpt(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    turns = row.get("conversations")
    if turns is None:
        return None, _wrong_shape(row, "sharegpt")
    if not isinstance(turns, list) or not turns:
        return None, "field 'conversations' must be a non-empty list of {from, value} turns"
    messages = []
    system = row.get("system")
    if system is not None:
        if not _text(system):
            return None, "field 'system' must be a non-empty string"
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not _text(turn.get("value")):
            return None, f"conversations[{i}] must be an object with a non-empty string 'value'"
        role = _SPEAKERS.get(turn.get("from"))  # type: ignore[arg-type]
        if role is None:
            return None, (f"conversations[{i}] has from {turn.get('from')!r}; use one of human, gpt, system "
                          "(or user, assistant)")
        if role == "system" and (i != 0 or messages):
            return None, f"conversations[{i}] is a system turn; only the first turn may be"
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        return None, "the last turn of 'conversations' must be gpt's (the answer to train on and score)"
    if not any(m["role"] == "user" for m in messages):
        return None, "'conversations' needs at least one human turn"
    return {"messages": messages}, None


def _alpaca(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    if "instruction" not in row or "output" not in row:
        return None, _wrong_shape(row, "alpaca")
    for field in ("instruction", "output"):
        if not _text(row[field]):
            return None, f"field {field!r} must be a non-empty string"
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        return None, f"field 'input' must be a string, got {type(extra).__name__}"
    if row.get("history"):  # LLaMA-Factory's earlier turns: dropping them would train a different row
        return None, "field 'history' is not read; write multi-turn rows in the sharegpt or messages format"
    system = row.get("system")
    if system is not None and not _text(system):
        return None, "field 'system' must be a non-empty string"
    prompt = row["instruction"].strip() + (f"\n\n{extra.strip()}" if extra and extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {"messages": messages}, None

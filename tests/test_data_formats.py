"""Instruction data formats (data.format): messages, ShareGPT and Alpaca files read into the same chat rows;
a row of the wrong shape names its file, line and the shape expected. No model, no training."""

import json
from pathlib import Path

import pytest

from lorafleet.config import ConfigError
from lorafleet.config.finetune import parse_config
from lorafleet.data import DataError, read_data_split, read_split
from lorafleet.tasks import get_task

FORMATS = Path(__file__).parent / "data" / "formats"
INSTRUCTION = get_task("instruction")


def _rows(path: Path, data_format: str) -> list[dict]:
    return [ex.row for ex in read_split(str(path), INSTRUCTION, "train", data_format=data_format)]


def test_the_three_formats_read_into_the_same_chat_rows():
    messages = _rows(FORMATS / "messages.jsonl", "messages")
    assert messages == [json.loads(line) for line in (FORMATS / "messages.jsonl").read_text().splitlines()]
    # the same conversations in ShareGPT (from: system/human/gpt, and the user/assistant aliases on line 3)
    assert _rows(FORMATS / "sharegpt.jsonl", "sharegpt") == messages
    alpaca = _rows(FORMATS / "alpaca.jsonl", "alpaca")
    # Alpaca: the system field first, the input after the instruction and a blank line, output the answer
    assert alpaca[0] == messages[0] and alpaca[2] == messages[2]
    assert alpaca[1] == {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    for name, rows in (("messages", messages), ("sharegpt", messages), ("alpaca", alpaca)):
        assert _rows(FORMATS / f"{name}.jsonl", "auto") == rows  # auto finds each shape by its fields
    # what evaluation prompts with and scores against: the turns before the answer, and the answer
    assert INSTRUCTION.instruction(alpaca[2]) == [{"role": "user", "content": "Translate to French.\n\ncat"}]
    assert INSTRUCTION.target(alpaca[2]) == "chat"


@pytest.mark.parametrize("data_format, other", [("sharegpt", "messages"), ("alpaca", "sharegpt"), ("messages", "alpaca")])
def test_an_explicit_format_names_file_line_and_the_shape_expected(data_format, other):
    path = FORMATS / f"{other}.jsonl"
    with pytest.raises(DataError) as err:
        read_split(str(path), INSTRUCTION, "train", data_format=data_format)
    assert str(err.value).startswith(f"{path}:1: expected {{")
    assert f"(data.format: {data_format}), got fields ['" in str(err.value)


@pytest.mark.parametrize("line, data_format, problem", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}, "sharegpt",
     "conversations[1] has from 'bot'; use one of human, gpt, system (or user, assistant)"),
    ({"conversations": [{"from": "gpt", "value": "yo"}, {"from": "human", "value": "hi"}]}, "auto",
     "the last turn of 'conversations' must be gpt's"),
    ({"instruction": "Add 2 and 3.", "input": "", "output": " "}, "alpaca", "field 'output' must be a non-empty string"),
    ({"prompt": "hi", "completion": "yo"}, "auto", "no known instruction row shape among its fields ['completion', 'prompt']"),
])
def test_a_bad_row_names_file_and_line(tmp_path, line, data_format, problem):
    path = tmp_path / "train.jsonl"
    good = {"instruction": "Say hi", "output": "hi"} if data_format != "sharegpt" else \
        {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as err:
        read_split(str(path), INSTRUCTION, "train", data_format=data_format)
    assert str(err.value).startswith(f"{path}:2: {problem}")


def test_the_run_config_carries_the_format(tmp_path):
    raw = {"task": {"name": "instruction"}, "data": {"train": str(FORMATS / "sharegpt.jsonl"), "format": "sharegpt"}}
    cfg = parse_config(raw, home=tmp_path)
    assert read_data_split(cfg.data, INSTRUCTION, "train")[2].row["messages"][0]["content"] == "Translate to French.\n\ncat"
    cfg = parse_config({**raw, "data": {**raw["data"], "format": "alpaca"}}, home=tmp_path)
    with pytest.raises(DataError, match=r"sharegpt\.jsonl:1: expected \{instruction, input\?, output\} \(data.format: alpaca\)"):
        read_data_split(cfg.data, INSTRUCTION, "train")
    # synthetic rows are the task's own shape whatever data.format says
    assert read_split("synthetic", INSTRUCTION, "validation", synthetic_n=2, data_format="alpaca")
    with pytest.raises(ConfigError, match="data.format 'sharegpt' is for task 'instruction'"):
        parse_config({"task": {"name": "qa"}, "data": {"format": "sharegpt"}}, home=tmp_path)

"""Data: file:line errors, field mapping, every file format, loss on answer tokens only."""

import json

import pytest

from lorafleet.base_model import load_tokenizer
from lorafleet.data import IGNORE_INDEX, DataError, encode_rows, prompt_ids, read_split, target_ids
from lorafleet.tasks import get_task

CLS = get_task("classification")


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "hi", "label": "billing"}\n\n{"text": "oops"\n')
    with pytest.raises(DataError, match=rf"{p}:3: not valid JSON"):
        read_split(str(p), CLS, "train")


def test_jsonl_bad_label_names_line_and_problem(tmp_path):
    p = tmp_path / "train.jsonl"
    rows = [{"text": "charged twice", "label": "billing"}, {"text": "x", "label": "refunds"}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as err:
        read_split(str(p), CLS, "train")
    assert f"{p}:2:" in str(err.value) and "refunds" in str(err.value)


def test_csv_missing_field_names_line(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("body,category\ncharged twice,billing\nlate parcel,\n")
    with pytest.raises(DataError, match=rf"{p}:3:"):
        read_split(str(p), CLS, "train", fields={"text": "body", "label": "category"})


def test_field_mapping_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "train.parquet"
    pq.write_table(pa.table({"body": ["charged twice", "parcel is late"], "category": ["billing", "shipping"]}), p)
    examples = read_split(str(p), CLS, "train", fields={"text": "body", "label": "category"})
    assert [e.row["label"] for e in examples] == ["billing", "shipping"]
    assert examples[1].where == f"{p}:row 2"


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(str(tmp_path / "nope.jsonl"), CLS, "train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_split(str(tmp_path / "empty.jsonl"), CLS, "train")


def test_loss_only_on_answer_tokens(base_model):
    tok = load_tokenizer(str(base_model))
    examples = read_split("synthetic", CLS, "train", synthetic_n=3)
    for ex, enc in zip(examples, encode_rows(tok, CLS, examples, 256)):
        n_prompt = len(prompt_ids(tok, CLS.instruction(ex.row)))
        target = target_ids(tok, CLS.target(ex.row))
        assert enc["input_ids"] == prompt_ids(tok, CLS.instruction(ex.row)) + target
        assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert enc["labels"][n_prompt:] == target
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target, skip_special_tokens=True).strip() == ex.row["label"]


def test_too_long_row_is_an_error_not_truncated(base_model):
    tok = load_tokenizer(str(base_model))
    examples = read_split("synthetic", CLS, "train", synthetic_n=2)
    with pytest.raises(DataError, match=r"synthetic:classification:train:0: \d+ tokens, over data.max_seq_len=16"):
        encode_rows(tok, CLS, examples, 16)


def test_prompt_contract_uses_chat_template(base_model):
    tok = load_tokenizer(str(base_model))
    text = tok.decode(prompt_ids(tok, "Say hi.\nAnswer:\n"))
    assert text.startswith("<|user|>\nSay hi.") and text.endswith("<|assistant|>\n")


def test_truncate_left_keeps_the_answer_right_keeps_the_start(base_model):
    """data.truncate: 'left' drops the start of the prompt and keeps every answer token, 'right' keeps
    the first max_seq_len tokens (the answer's end goes); 'error' stays the error it was, now naming
    the option; a row cut down to no answer token is an error, never a row that trains on nothing."""
    tok = load_tokenizer(str(base_model))
    task = get_task("summarization")
    [ex] = read_split("synthetic", task, "train", synthetic_n=1)
    prompt = prompt_ids(tok, task.instruction(ex.row))
    target = target_ids(tok, task.target(ex.row))
    [full] = encode_rows(tok, task, [ex], 1024)
    assert full["input_ids"] == prompt + target and len(target) > 4
    n = len(prompt) + len(target) - 3  # 3 tokens too long

    [left] = encode_rows(tok, task, [ex], n, truncate="left")
    assert left["input_ids"] == (prompt + target)[3:] and left["labels"] == full["labels"][3:]
    assert left["labels"][-len(target):] == target  # the whole answer, EOS included
    [right] = encode_rows(tok, task, [ex], n, truncate="right")
    assert right["input_ids"] == (prompt + target)[:n] and right["labels"][len(prompt):] == target[:-3]

    with pytest.raises(DataError, match=rf"synthetic:summarization:train:0: {n + 3} tokens, over "
                       rf"data.max_seq_len={n}; shorten the row or raise data.max_seq_len, or set data.truncate"):
        encode_rows(tok, task, [ex], n)
    with pytest.raises(DataError, match=r"synthetic:summarization:train:0: .*data.truncate='right' leaves none of "
                       r"its answer tokens: use data.truncate 'left' or raise data.max_seq_len"):
        encode_rows(tok, task, [ex], len(prompt), truncate="right")  # the prompt alone fills it
    [prompt_cut] = encode_rows(tok, task, [ex], len(prompt), truncate="left")
    assert prompt_cut["input_ids"] == (prompt + target)[-len(prompt):]


def test_the_run_encodes_with_its_truncate_setting(base_model, tmp_path):
    """RunContext.encode passes data.truncate to every split it encodes (train, and the length check
    of validation and test)."""
    from lorafleet.config import parse_config
    from lorafleet.train.context import RunContext

    tok = load_tokenizer(str(base_model))
    task = get_task("summarization")
    splits = {s: read_split("synthetic", task, s, synthetic_n=2) for s in ("train", "validation", "test")}
    cfg = parse_config({"task": {"name": "summarization"}, "data": {"max_seq_len": 32}}, home=tmp_path)
    with pytest.raises(DataError, match="over data.max_seq_len=32"):
        RunContext(cfg, task, None, splits, None).encode(tok)
    cfg.data.truncate = "left"
    encoded = RunContext(cfg, task, None, splits, None).encode(tok)
    assert [len(e["input_ids"]) for e in encoded] == [32, 32]
    assert all(e["labels"][-1] == tok.eos_token_id for e in encoded)

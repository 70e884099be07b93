"""`lorafleet predict`: batch inference on Ray Data + vLLM (docs/PREDICT.md).

Fast: reading rows with bad ones skipped (file:line), blocks, part files and the manifest, the settings,
an unknown adapter refused before Ray starts, and a block's requests and answers on an engine that is
transformers+peft itself (label probabilities equal `evaluate.label_probs`, one request per prefix).
Slow (one run, killed halfway, then resumed; the engine start-ups are most of its time): 2,000 rows
with a bad row among them, a summarization adapter, a translation adapter and the base model as three
columns of one engine, 2 replicas (1 for the resumed run). Every row is written exactly once, the
bad row is named by file and line, the parts written before the kill are not written again, and a
sample of rows equals transformers+peft greedy token for token, for both adapters and the base model
(batched together).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import LORAFLEET, REPO, HFEngine, cli_env, last_json, run_cli, stop_tree


def _tasks():
    from lorafleet.tasks import get_task

    return [get_task("classification")]


# ----- fast -----------------------------------------------------------------------------------------

def test_bad_rows_are_named_by_file_and_line_and_the_rest_kept(tmp_path):
    from lorafleet.predict.rows import read_rows

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "my card was charged twice"}\n{not json\n\n[1, 2]\n{"body": "no text"}\n'
                    '{"text": "   "}\n{"body": "mapped"}\n')
    good, bad = read_rows(str(data), _tasks())
    assert [ex.where for ex in good] == [f"{data}:1"]
    assert [w for w, _ in bad] == [f"{data}:{n}" for n in (2, 4, 5, 6, 7)]
    assert "not valid JSON" in bad[0][1] and "got list" in bad[1][1] and "missing field 'text'" in bad[2][1]
    assert "is empty" in bad[3][1]
    # data.fields mapping, as training applies it: the 'body' rows become usable
    good, bad = read_rows(str(data), _tasks(), fields={"text": "body"})
    assert [ex.where for ex in good] == [f"{data}:1", f"{data}:5", f"{data}:7"]
    assert good[1].row["text"] == "no text" and len(bad) == 3


def test_csv_row_with_extra_cells_is_skipped(tmp_path):
    from lorafleet.predict.rows import read_rows

    data = tmp_path / "rows.csv"
    data.write_text("text\nfirst ticket\n\"second\",extra\nthird ticket\n")
    good, bad = read_rows(str(data), _tasks())
    assert [ex.row["text"] for ex in good] == ["first ticket", "third ticket"]
    assert bad == [(f"{data}:3", "more cells than the header has columns")]


def test_no_usable_row_is_a_data_error(tmp_path):
    from lorafleet.data import DataError
    from lorafleet.predict.rows import read_rows

    data = tmp_path / "rows.jsonl"
    data.write_text('{"body": 1}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: no usable row; the first problem: .*rows.jsonl:1: missing"):
        read_rows(str(data), _tasks())


def test_blocks_parts_and_manifest(tmp_path):
    import pyarrow.parquet as pq

    from lorafleet.predict.output import open_output, write_part, written_blocks
    from lorafleet.predict.rows import blocks

    assert [(r.start, r.stop) for r in blocks(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    out = str(tmp_path / "out")
    manifest = {"data": "d.jsonl", "columns": {"a": "a@1"}, "block_rows": 2, "format": "parquet"}
    assert open_output(out, manifest) is False  # a new output folder
    rows = [{"where": "d.jsonl:1", "a": {"label": "billing", "scores": {"billing": 0.75, "account": 0.25}}}]
    write_part(out, 3, "parquet", rows)
    assert written_blocks(out, "parquet") == {3} and written_blocks(out, "jsonl") == set()
    assert pq.read_table(Path(out) / "part-00003.parquet").to_pylist() == rows
    assert not [p for p in Path(out).iterdir() if p.name.startswith(".")]  # no temporary file left
    assert open_output(out, manifest) is True  # the same run: resumed
    with pytest.raises(FileExistsError, match=r"columns: \{'a': 'a@1'\} there, \{'a': 'a@2'\} now"):
        open_output(out, {**manifest, "columns": {"a": "a@2"}})


def test_settings_report_every_problem_at_once():
    from lorafleet.config import ConfigError, validate
    from lorafleet.config.predict import PredictSettings

    with pytest.raises(ConfigError) as err:
        validate(PredictSettings, {"adapters": ["base"], "data": "d.jsonl", "out": "o", "replicas": 0,
                                   "format": "csv"}, "lorafleet predict")
    text = str(err.value)
    assert "replicas" in text and "format" in text
    with pytest.raises(ConfigError, match="needs --task"):
        validate(PredictSettings, {"adapters": ["base"], "data": "d.jsonl", "out": "o"}, "lorafleet predict")


def test_unknown_adapter_is_refused_before_ray_starts(tmp_path, base_model, capsys, monkeypatch):
    import os

    import ray

    from lorafleet.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hello"}\n')
    monkeypatch.setenv("LORAFLEET_HOME", os.environ.get("LORAFLEET_HOME", ""))  # main's --home moves it; restored after
    code = main(["predict", "nope", str(data), "--out", str(tmp_path / "out"), "--base-model", str(base_model),
                 "--home", str(tmp_path / "home")])
    assert code == 2
    assert "error: artifact 'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_label_scores_share_prefixes_and_equal_label_probs(tmp_path, base_model):
    """The replica's request plan and answer assembly, on an engine that is transformers+peft itself."""
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids, target_ids
    from lorafleet.evaluate import label_probs, load_for_eval
    from lorafleet.predict.columns import Column
    from lorafleet.predict.replica import answer_block
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.tasks import get_task
    from types import SimpleNamespace as NS

    adapter = make_lora_adapter(base_model, tmp_path / "tickets", seed=3)
    engine = HFEngine(base_model, {"tickets@1": adapter})
    tok = load_tokenizer(str(base_model))
    classify, summarize = get_task("classification"), get_task("summarization")
    columns = [Column("tickets", "tickets@1", classify, 8, 8), Column("base", "base", summarize, 3)]
    texts = ["my card was charged twice", "the app crashes on start", "where is my parcel"]
    items = [{"where": f"d.jsonl:{i + 1}", "row": {"text": t}} for i, t in enumerate(texts)]
    items.append({"where": "d.jsonl:4", "row": {"text": "word " * 400}})  # over max_model_len
    rows, bad = answer_block(engine, tok, columns, {"tickets": NS(lora_name="tickets@1")}, 256, items)
    assert [r["where"] for r in rows] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    assert bad[0][0] == "d.jsonl:4" and "exceed --max-model-len=256" in bad[0][1]
    # Scoring: one request per distinct prefix (the prompt, then each label's tokens but the last).
    label_ids = [target_ids(tok, lab) for lab in classify.labels]
    prefixes = 1 + len({tuple(ids[:k]) for ids in label_ids for k in range(1, len(ids))})
    scoring = [r for r in engine.requests if r[1] == 1 and r[2] == "tickets@1"]
    assert len(scoring) == len(texts) * prefixes
    model, _, _ = load_for_eval(adapter, str(base_model))
    want = label_probs(model, tok, [prompt_ids(tok, classify.instruction({"text": t})) for t in texts],
                       list(classify.labels))
    for row, p in zip(rows, want.tolist()):
        assert row["tickets"]["scores"] == pytest.approx(dict(zip(classify.labels, p)), abs=1e-5)
        assert row["tickets"]["label"] == max(row["tickets"]["scores"], key=row["tickets"]["scores"].get)
        assert set(row["base"]) == {"summary", "adapter"} and row["base"]["adapter"] == "base"
        assert row["text"] in texts


# ----- slow: the real run -----------------------------------------------------------------------------

N_ROWS, BLOCK, BAD_LINE, TOKENS = 2000, 100, 777, 4


def _register(registry, name: str, task: str, base: Path, work: Path, seed: int):
    """A LoRA adapter with random non-zero A and B (no training), registered with its base's fingerprint."""
    from lorafleet.base_model import base_fingerprint
    from lorafleet.serving.testing import make_lora_adapter

    src = make_lora_adapter(base, work / name, seed=seed)
    labels = ["billing", "technical", "account", "shipping"] if task == "classification" else []
    meta = {"task": task, "method": "lora", "labels": labels, "base_model": str(base),
            "base_fingerprint": base_fingerprint(base), "config": {}}
    return registry.register(name, src, meta)


def _parts(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}


@pytest.mark.slow
def test_predict_2000_rows_killed_and_resumed_each_row_once(tmp_path, base_model):
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import reference_greedy
    from lorafleet.tasks import get_task

    home = tmp_path / "home"
    registry = Registry(home / "registry")
    notes = _register(registry, "notes", "summarization", base_model, tmp_path / "work", seed=1)
    zilan = _register(registry, "zilan", "translation", base_model, tmp_path / "work", seed=2)
    texts = [r["text"] for r in get_task("classification").synthetic("test", N_ROWS)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(BAD_LINE - 1, json.dumps({"body": "a row without its text"}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["predict", "notes", str(data), "--adapter", "zilan", "--adapter", "base", "--out", str(out),
            "--replicas", "2", "--block-rows", str(BLOCK), "--max-new-tokens", str(TOKENS), "--json",
            "--home", str(home)]
    env = cli_env(home)

    # 1. Started, then killed (SIGKILL, the whole process group) once some blocks are written.
    log = tmp_path / "first-run.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([LORAFLEET, *args], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while len(_parts(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            exited = proc.poll()
            stop_tree(proc, signal.SIGKILL, group=True, reap=10)
    before = _parts(out)
    n_blocks = N_ROWS // BLOCK
    assert 0 < len(before) < n_blocks, (f"killed with {len(before)} of {n_blocks} blocks written (exit code before the "
                                        f"kill: {exited}): not halfway\n{log.read_text()[-3000:]}")

    # 2. Run again, on one replica (the manifest pins what each block holds, not how many engines write
    # them; one engine start less for the suite): only the missing blocks are written; the bad row is
    # named by file and line.
    again = [*args]
    again[again.index("--replicas") + 1] = "1"
    proc2 = run_cli(again, env, timeout=600)
    result = last_json(proc2.stdout)
    assert result["resumed_blocks"] == len(before) and result["blocks"] == n_blocks
    assert result["written"] == N_ROWS - BLOCK * len(before)
    assert f"skipped {data}:{BAD_LINE}: missing field 'text'" in proc2.stderr
    assert result["bad_rows"] == [f"{data}:{BAD_LINE}: missing field 'text'"]
    after = _parts(out)
    assert len(after) == n_blocks and all(after[name] == stamp for name, stamp in before.items())

    # 3. Every row exactly once, in input order, with all three columns.
    rows = [json.loads(line) for i in range(n_blocks) for line in (out / f"part-{i:05d}.jsonl").read_text().splitlines()]
    expected = [f"{data}:{n}" for n in range(1, N_ROWS + 2) if n != BAD_LINE]
    assert [r["where"] for r in rows] == expected and [r["text"] for r in rows] == texts
    assert {r["notes"]["adapter"] for r in rows} == {"notes@1"} and {r["zilan"]["adapter"] for r in rows} == {"zilan@1"}

    # 4. A sample equals transformers+peft greedy, token for token, for both adapters and the base model,
    # whose requests were batched together in each engine call.
    tok = load_tokenizer(str(base_model))
    sample = rows[::250]
    for column, adapter, task, key in (("notes", notes.path, "summarization", "summary"), ("base", None, "summarization",
                                       "summary"), ("zilan", zilan.path, "translation", "translation")):
        prompts = [prompt_ids(tok, get_task(task).instruction(r)) for r in sample]
        ref = reference_greedy(base_model, adapter, prompts, TOKENS)
        assert [r[column][key] for r in sample] == [tok.decode(ids, skip_special_tokens=True).strip() for ids in ref], column
    assert any(r["notes"]["summary"] != r["base"]["summary"] for r in sample), "the adapter changed nothing"

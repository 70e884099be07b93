"""`lorafleet adapters export`: a registered LoRA adapter out of lorafleet as a peft folder (+ model card),
merged into its base (transformers loads it, its greedy tokens equal base + adapter through peft; vLLM
serves it as a plain model), in another dtype; whole models copied; the refusals; the hub push.

The adapter is made without training (random, non-zero A and B: `make_lora_adapter`) on the tiny base and
registered through the registry API with a real training config's metadata (`artifact_metadata`), so
the card is written from what a run records. The s3 registry's export is in tests/test_s3.py (its server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

PROMPTS = ["Classify the support ticket.\nTicket: my package has not arrived\nLabel:\n",
           "Classify the support ticket.\nTicket: I forgot my password\nLabel:\n",
           "Summarize: the app crashes every time I open the settings page on my phone"]
NEW_TOKENS = 12
TEST_METRICS = {"accuracy": 0.8125, "macro_f1": 0.79}  # metadata handed in (no run): the card must show them


@pytest.fixture(scope="module")
def reg(tmp_path_factory, base_model):
    """A registry holding a LoRA adapter (`tickets@1`) with a run's metadata, the base as a full model
    (`whole@1`) and a classification head (`head@1`)."""
    from lorafleet.config import load_config
    from lorafleet.registry import Registry
    from lorafleet.serving.testing import make_lora_adapter
    from lorafleet.train.results import artifact_metadata

    work = tmp_path_factory.mktemp("export")
    registry = Registry(work / "registry")
    cfg = load_config(REPO / "configs/tiny/classification-lora.yaml", [f"model.name_or_path={base_model}"], work)
    labels = ["billing", "technical", "account", "shipping"]
    meta = artifact_metadata(cfg, labels, test_metrics=TEST_METRICS, trainable_params=32768, wall_time_s=12.5,
                             steps=300, run_dir=str(work / "runs/tickets-x"), total_params=1_400_000).dump()
    adapter = make_lora_adapter(base_model, work / "adapter", seed=3)
    registry.register("tickets", adapter, meta)
    registry.register("whole", base_model, {**meta, "method": "full"})
    head = work / "head"
    head.mkdir()
    (head / "head.json").write_text(json.dumps({"labels": labels}))
    (head / "head.safetensors").write_bytes(b"\0" * 16)
    registry.register("head", head, {**meta, "method": "head"})
    return registry, adapter, work


@pytest.fixture(scope="module")
def merged(reg, tmp_path_factory):
    """`tickets` exported with --merge in fp32 (shared by the transformers and the vLLM round trip)."""
    from lorafleet.export import export_artifact

    out = tmp_path_factory.mktemp("merged") / "tickets-merged"
    return export_artifact(reg[0], "tickets@1", out, merge=True, dtype="fp32"), out


@pytest.fixture(scope="module")
def through_peft(reg, base_model) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy tokens of base + the registered adapter through transformers + peft, fp32)."""
    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.serving.testing import reference_greedy

    tok = load_tokenizer(str(base_model))
    prompts = [prompt_ids(tok, p) for p in PROMPTS]
    return prompts, reference_greedy(base_model, reg[1], prompts, NEW_TOKENS)


def test_plain_export_is_a_peft_folder_with_a_model_card(reg, base_model, tmp_path, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file

    from lorafleet.base_model import base_fingerprint, load_model
    from lorafleet.cli import main

    registry, adapter, _ = reg
    out = tmp_path / "tickets-peft"
    monkeypatch.setenv("LORAFLEET_HOME", os.environ.get("LORAFLEET_HOME", ""))  # main's --home sets it: restored
    monkeypatch.setenv("LORAFLEET_REGISTRY", str(registry.root))
    assert main(["adapters", "export", "tickets", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model)
    assert config["r"] == 8 and config["target_modules"] == json.loads((adapter / "adapter_config.json").read_text())[
        "target_modules"]
    # The tensors are the registered ones, and peft loads the folder onto the base.
    theirs, ours = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    model = PeftModel.from_pretrained(load_model(str(base_model)), str(out))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(theirs) and all(v.abs().sum() > 0 for v in loaded.values())

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model:" not in card.split("---")[1]  # a path
    for text in (base_fingerprint(base_model), "task: classification", "billing, technical, account, shipping",
                 "| test | accuracy | 0.8125 |", "| test | macro_f1 | 0.7900 |", "- r: 8", "- train: synthetic",
                 "trainable parameters: 32,768", "optimizer steps: 300", "checked at export", "```yaml\n",
                 "\nname: tickets-lora\n", "lorafleet registry: `tickets@1`"):
        assert text in card, text


def test_base_names_a_hub_id_and_dtype_casts_the_adapter(reg, tmp_path):
    from safetensors.torch import load_file

    from lorafleet.export import export_artifact

    registry, adapter, _ = reg
    result = export_artifact(registry, "tickets", tmp_path / "hub", base="acme/tiny-base", dtype="bf16")
    out = Path(result.out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-base"
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny-base" in card and "not checked at export: `acme/tiny-base`" in card
    theirs, ours = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k].to(torch.bfloat16)) for k in theirs)


def test_merged_export_loads_in_transformers_and_generates_what_peft_does(merged, through_peft, base_model):
    from transformers import AutoModelForCausalLM

    from lorafleet.serving.testing import reference_greedy

    result, out = merged
    assert result.kind == "merged" and result.dtype == "float32"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= set(result.files)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and not any("lora" in k for k in model.state_dict())
    prompts, expected = through_peft
    assert expected != reference_greedy(base_model, None, prompts, NEW_TOKENS)  # the adapter changes answers
    assert reference_greedy(out, None, prompts, NEW_TOKENS) == expected
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_a_dora_adapter_merges_into_a_model_vllm_can_serve(reg, through_peft, base_model, tmp_path):
    """DoRA: serving refuses the adapter (vLLM has no DoRA kernels); merged, it is a plain model."""
    from peft import LoraConfig, get_peft_model

    from lorafleet.base_model import load_model
    from lorafleet.export import export_artifact
    from lorafleet.serving.testing import reference_greedy

    torch.manual_seed(7)
    model = get_peft_model(load_model(str(base_model)), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True))
    with torch.no_grad():  # as make_lora_adapter: large enough to change greedy tokens
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    model.save_pretrained(str(tmp_path / "dora"))
    reg[0].register("dora", tmp_path / "dora", {"task": "classification", "method": "lora",
                                                "base_model": str(base_model)})
    result = export_artifact(reg[0], "dora", tmp_path / "merged", merge=True)
    prompts, _ = through_peft
    expected = reference_greedy(base_model, tmp_path / "dora", prompts, NEW_TOKENS)
    assert expected != reference_greedy(base_model, None, prompts, NEW_TOKENS)
    assert reference_greedy(result.out, None, prompts, NEW_TOKENS) == expected
    assert "no fingerprint recorded" in (tmp_path / "merged" / "README.md").read_text()


def test_bf16_merge_is_the_fp32_merge_rounded_once(reg, merged, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorafleet.export import export_artifact

    result = export_artifact(reg[0], "tickets@1", tmp_path / "bf16", merge=True, dtype="bf16")
    assert json.loads((Path(result.out) / "config.json").read_text())["dtype"] == "bfloat16"
    fp32, bf16 = load_file(merged[1] / "model.safetensors"), load_file(Path(result.out) / "model.safetensors")
    assert fp32.keys() == bf16.keys()
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert AutoModelForCausalLM.from_pretrained(result.out, dtype="auto").dtype == torch.bfloat16


def test_a_whole_model_is_copied_and_converted(reg, base_model, tmp_path):
    from lorafleet.export import export_artifact
    from lorafleet.registry import sha256_file

    as_is = export_artifact(reg[0], "whole", tmp_path / "as-is", merge=True)
    assert as_is.kind == "model" and as_is.dtype == "float32"
    assert sha256_file(Path(as_is.out) / "model.safetensors") == sha256_file(base_model / "model.safetensors")
    half = export_artifact(reg[0], "whole", tmp_path / "fp16", dtype="fp16")
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(half.files)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(Path(half.out) / "model.safetensors").values()} == {torch.float16}


def test_refusals_leave_nothing_behind(reg, tmp_path, monkeypatch):
    from lorafleet.export import ExportError, export_artifact
    from lorafleet.export import flow
    from lorafleet.registry import ArtifactNotFoundError

    registry, _, work = reg
    with pytest.raises(ExportError, match=r"head@1 is a classification head .* `lorafleet eval head@1`"):
        export_artifact(registry, "head", tmp_path / "h")
    with pytest.raises(ArtifactNotFoundError, match="available"):
        export_artifact(registry, "nope", tmp_path / "n")
    with pytest.raises(ExportError, match="--dtype"):
        export_artifact(registry, "tickets", tmp_path / "d", dtype="int8")
    # Another base (same files, one config value changed): its fingerprint differs.
    other = tmp_path / "other-base"
    other.mkdir()
    config = json.loads((Path(registry.resolve("tickets").meta.base_model) / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(ExportError, match="trained on a base with fingerprint"):
        export_artifact(registry, "tickets", tmp_path / "o", merge=True, base=str(other))
    with pytest.raises(ExportError, match="--merge needs the base model's weights"):
        export_artifact(registry, "tickets", tmp_path / "o", merge=True, base=str(tmp_path / "absent"))

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="pass --force"):
        export_artifact(registry, "tickets", taken)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(flow, "merge_lora", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_artifact(registry, "tickets", taken, merge=True, force=True)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]  # a failed export replaces nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-base", "taken"]  # no staging folder left
    monkeypatch.undo()
    export_artifact(registry, "tickets", taken, force=True)
    assert not (taken / "mine.txt").exists() and (taken / "adapter_config.json").is_file()


class _FakeHfApi:
    """A stand-in for huggingface_hub.HfApi: the Hub cannot be reached from these machines (no internet), so
    this fake at that edge records the calls export makes instead of uploading."""

    calls: list[tuple[str, dict]] = []
    fail: bool = False

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise ConnectionError("hub unreachable")
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())  # what would be uploaded, now
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_to_hub_uploads_the_finished_folder(reg, tmp_path, monkeypatch):
    import huggingface_hub

    from lorafleet.export import ExportError, export_artifact

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls = []
    result = export_artifact(reg[0], "tickets", tmp_path / "pushed", push_to_hub="acme/tickets-lora")
    assert result.hub_url == "https://huggingface.co/acme/tickets-lora/commit/abc"
    (c1, create), (c2, upload) = _FakeHfApi.calls
    assert (c1, c2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "acme/tickets-lora" and create["exist_ok"] is True
    assert upload["folder_path"] == result.out and upload["repo_type"] == "model"
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "tickets@1" in upload["commit_message"]
    monkeypatch.setattr(_FakeHfApi, "fail", True)
    with pytest.raises(ExportError, match=r"complete in .* pushing it to acme/x failed: ConnectionError"):
        export_artifact(reg[0], "tickets", tmp_path / "offline", push_to_hub="acme/x")
    assert (tmp_path / "offline" / "adapter_config.json").is_file()


_VLLM_SCRIPT = r'''
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    model, prompts_json, n, out = sys.argv[1:]
    # A plain model (no enable_lora). The engine core and its worker run in this process ("uni" executor,
    # VLLM_ENABLE_V1_MULTIPROCESSING=0): each spawned process re-imports vLLM, ~3x the start-up on 2 cores.
    llm = LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, distributed_executor_backend="uni")
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts_json)],
                        SamplingParams(temperature=0, max_tokens=int(n)))
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(out, "w"))
'''


@pytest.mark.slow
def test_vllm_serves_the_merged_model_with_peft_tokens(merged, through_peft, base_model, tmp_path):
    """vLLM's offline engine, in a process of its own, on the merged folder."""
    from lorafleet.base_model import load_tokenizer

    pytest.importorskip("vllm")
    prompts, expected = through_peft
    script, out = tmp_path / "engine.py", tmp_path / "out.json"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    subprocess.run([sys.executable, str(script), str(merged[1]), json.dumps(prompts), str(NEW_TOKENS), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=600, stdout=subprocess.DEVNULL)
    eos = load_tokenizer(str(base_model)).eos_token_id
    assert [[t for t in ids if t != eos] for ids in json.loads(out.read_text())] == expected

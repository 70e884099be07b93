"""The vLLM general plugin that makes LoRA index -1 mean "no adapter" on CPU.

Two levels: the punica ops themselves (fast, no engine), and the offline vLLM engine with base
and adapter requests in one batch, each compared with transformers+peft greedy (fp32).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")


def test_plugin_is_registered_as_vllm_general_plugin():
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "lorafleet.serving.plugin:register" in values


def test_minus_one_adds_nothing_and_other_rows_are_unchanged():
    from vllm.lora.ops.torch_ops import lora_ops as upstream

    from lorafleet.serving import plugin

    torch.manual_seed(0)
    slots, rank, hidden = 3, 4, 8
    a = torch.randn(slots, 1, rank, hidden)  # [slots, 1, r, in]
    b = torch.randn(slots, 1, hidden, rank)  # [slots, 1, out, r]
    x = torch.randn(4, hidden)
    idx = torch.tensor([0, -1, 2, -1])

    def run(ops):
        buf = torch.zeros(4, rank)
        ops.bgmv_shrink(x, a, buf, idx, 0.5)
        y = torch.zeros(4, hidden)
        ops.bgmv_expand(buf, b, y, idx, add_inputs=True)
        z = torch.zeros(4, 2 * hidden)
        ops.bgmv_expand_slice(buf, b, z, idx, hidden, hidden, add_inputs=True)
        seq = torch.zeros(4, rank)
        ops.sgmv_shrink(x, a, seq, None, torch.tensor([2, 2]), torch.tensor([1, -1]), 2, 2, 4, 1.0)
        return y, z, seq

    y_up, z_up, _ = run(upstream)
    y, z, seq = run(plugin)
    # The bug: upstream applies the last slot to the -1 rows.
    assert y_up[1].abs().sum() > 0
    # The fix: -1 rows get exactly nothing, adapter rows exactly what upstream computes.
    assert torch.equal(y[[1, 3]], torch.zeros(2, hidden)) and torch.equal(z[[1, 3]], torch.zeros(2, 2 * hidden))
    torch.testing.assert_close(y[[0, 2]], y_up[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(z[[0, 2], hidden:], z_up[[0, 2], hidden:], rtol=0, atol=0)
    assert seq[2:].abs().sum() == 0 and seq[:2].abs().sum() > 0


def test_register_is_idempotent_and_patches_cpu_wrapper():
    from vllm.lora.punica_wrapper import punica_cpu

    from lorafleet.serving import plugin

    plugin.register()
    plugin.register()
    assert plugin.is_patched() and punica_cpu.bgmv_expand is plugin.bgmv_expand


_ENGINE_SCRIPT = r'''
import json, os, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
if __name__ == "__main__":
    base, a1, a2, prompts_json, n, out = sys.argv[1:]
    prompts = json.loads(prompts_json)
    llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=2, dtype="float32",
              max_model_len=512, enforce_eager=True)
    lrs = {"base": None, "a1": LoRARequest("a1", 1, a1), "a2": LoRARequest("a2", 2, a2)}
    jobs = [(k, i) for i in range(len(prompts)) for k in ("base", "a1", "a2")]
    # One generate() call: base and adapter requests are scheduled into the same engine steps.
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for k, i in jobs], SamplingParams(temperature=0, max_tokens=int(n)),
                        lora_request=[lrs[k] for k, i in jobs])
    json.dump([[k, i, list(o.outputs[0].token_ids)] for (k, i), o in zip(jobs, outs)], open(out, "w"))
'''


@pytest.mark.slow
def test_offline_engine_mixed_batch_equals_transformers_peft(tmp_path):
    """vLLM in its own process (spawned engine core loads the plugin via the entry point)."""
    import json
    import subprocess
    import sys

    from lorafleet.base_model import load_tokenizer
    from lorafleet.data import prompt_ids
    from lorafleet.serving.testing import make_lora_adapter, reference_greedy

    src = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet")) / "models" / "tiny"
    base = tmp_path / "tiny"
    if (src / "config.json").is_file():
        shutil.copytree(src, base)
    else:  # pragma: no cover - outside make
        from lorafleet.pretrain import build_base

        build_base(base, steps=0)
    a1 = make_lora_adapter(base, tmp_path / "a1", seed=1)
    a2 = make_lora_adapter(base, tmp_path / "a2", seed=2)
    tok = load_tokenizer(str(base))
    texts = ["my package has not arrived", "I forgot my password", "the app crashes on start"]
    prompts = [prompt_ids(tok, f"Classify the support ticket.\nTicket: {t}\nLabel:\n") for t in texts]
    n = 12
    ref = {"base": reference_greedy(base, None, prompts, n), "a1": reference_greedy(base, a1, prompts, n),
           "a2": reference_greedy(base, a2, prompts, n)}
    assert ref["a1"] != ref["base"] and ref["a2"] != ref["base"]
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)  # all general plugins, as in production
    subprocess.run([sys.executable, str(script), str(base), str(a1), str(a2), json.dumps(prompts), str(n), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=600, stdout=subprocess.DEVNULL)
    for kind, i, ids in json.loads(out.read_text()):
        assert [t for t in ids if t != tok.eos_token_id] == ref[kind][i], (kind, i)


def test_grouped_ops_equal_upstream_on_mixed_batches():
    """One matmul per adapter slot gives what upstream's per-token gather gives, for any mix of slots."""
    from vllm.lora.ops.torch_ops import lora_ops as upstream

    from lorafleet.serving import plugin

    torch.manual_seed(1)
    a, b, x = torch.randn(3, 1, 8, 64), torch.randn(3, 1, 96, 8), torch.randn(10, 64)
    for idx in (torch.zeros(10, dtype=torch.long), torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2])):
        outs = []
        for ops in (upstream, plugin):
            buf = torch.zeros(10, 8)
            ops.bgmv_shrink(x, a, buf, idx, 0.5)
            y = torch.zeros(10, 96)
            ops.bgmv_expand(buf, b, y, idx, add_inputs=True)
            outs.append((buf, y))
        for up, ours in zip(*outs):
            torch.testing.assert_close(ours, up, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="indices for 3 rows"):
        plugin.bgmv_shrink(x, a, torch.zeros(10, 8), torch.tensor([0, 1, 2]))


def test_prompt_logprob_rows_get_the_adapter_logits_term():
    """vLLM's prompt log-probs pass one request's rows with per-request indices (upstream crashed)."""
    from types import SimpleNamespace

    from lorafleet.serving import plugin

    torch.manual_seed(2)
    vocab, hidden, rank = 12, 6, 2
    a, b = torch.randn(2, 1, rank, hidden), torch.randn(2, 1, vocab, rank)
    x, logits = torch.randn(5, hidden), torch.randn(5, vocab)

    def run(indices, b_weights):
        y = logits.clone()
        plugin.add_lora_logits(SimpleNamespace(sampler_indices=torch.tensor(indices)), y, x, a, b_weights, 1.0)
        return y

    no_head = torch.zeros_like(b)  # adapters without lm_head weights: the term is exactly zero
    assert torch.equal(run([0, 1, -1], no_head), logits)
    torch.testing.assert_close(run([1, 1], b), logits + (x @ a[1, 0].t()) @ b[1, 0].t())
    with pytest.raises(RuntimeError, match="lm_head"):
        run([0, 1], b)
    torch.testing.assert_close(run([1, -1, 0, 1, 0], b)[1], logits[1])  # rows = requests: -1 adds nothing

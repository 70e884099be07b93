"""model.dtype other than float32, on CPU: mixed precision, the head rung, scoring, gradient accumulation.

No Ray here (but one slow bf16 LoRA run on the session's Ray): the tests call a worker's per-step pieces
directly (steps.build_model, steps.optimizer_steps), the way train.train_loop_per_worker does, and each
ladder rung's bf16 path is covered (full, partial, head, zero_shot, feature here; lora end to end).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lorafleet.train.checkpoint import save_artifact
from lorafleet.config import parse_config
from lorafleet.evaluate import evaluate_rows, load_for_eval
from lorafleet.head import HeadClassifier
from lorafleet.train.precision import Precision, training_precision
from lorafleet.train.steps import build_model, optimizer_steps
from lorafleet.tasks import get_task

LABELS = ["billing", "technical", "account", "shipping"]


def _cfg(base_model, tmp_path, dtype="bfloat16", method="full", **train):
    train = {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "batch_size": 4, **train}
    return parse_config({"model": {"name_or_path": str(base_model), "dtype": dtype},
                         "method": {"name": method}, "train": train}, home=tmp_path)


def _batches(n: int, labels_width: int | None = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 500, (4, 24), generator=g)
        labels = ids.clone() if labels_width is None else torch.randint(0, 4, (4, labels_width), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _setup(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return params, optimizer, scheduler


def _read(n: int) -> list[dict]:
    from lorafleet.data import read_split

    return [ex.row for ex in read_split("synthetic", get_task("classification"), "validation", synthetic_n=n, seed=0)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_step_at_small_lr_changes_low_precision_weights(base_model, tmp_path, dtype):
    # A bf16 weight near 0.02 moves in steps of ~1e-4: AdamW's ~1e-5 update at lr 1e-5 rounds away
    # on almost every element when the weights (and AdamW's state) are bf16 (7% moved, measured).
    cfg = _cfg(base_model, tmp_path, dtype=dtype)
    model = build_model(cfg, None)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # master weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params, optimizer, scheduler = _setup(model, cfg)
    precision = training_precision(cfg.model.dtype, torch.device("cpu"))
    assert precision.dtype == getattr(torch, dtype)
    assert (precision.scaler is not None) == (dtype == "float16")
    # fp16: GradScaler starts at a scale of 65536 and skips (and halves the scale on) any step whose
    # scaled gradients overflow; whether the first one does depends on the base build. A skipped
    # step must leave every weight as it was; the first step taken is the one checked.
    for batch in _batches(12):
        scale = precision.scaler.get_scale() if precision.scaler else None
        steps = list(optimizer_steps(model, [batch], cfg, device=torch.device("cpu"), optimizer=optimizer,
                                     scheduler=scheduler, params=params, precision=precision))
        assert len(steps) == 1 and torch.isfinite(steps[0][0])
        if scale is None or precision.scaler.get_scale() >= scale:
            break  # taken
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a skipped step changed weights"
    else:
        pytest.fail(f"GradScaler skipped 12 steps in a row (scale now {precision.scaler.get_scale()})")
    for name, p in model.named_parameters():
        if name.endswith("q_proj.weight") or name.endswith("up_proj.weight"):
            moved = (p.detach() != before[name]).float().mean().item()
            assert moved > 0.9, f"{name}: only {moved:.1%} of the weights moved"
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_float32_on_cpu_has_no_autocast():
    p = training_precision("float32", torch.device("cpu"))
    assert p == Precision(dtype=None, device_type="cpu", scaler=None)


def test_bf16_on_a_gpu_without_bf16_says_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="use 'float16'"):
        training_precision("bfloat16", torch.device("cuda"))
    p = training_precision("float32", torch.device("cuda"))  # the GPU default falls back to fp16 + GradScaler
    assert p.dtype == torch.float16 and p.scaler is not None


def test_partial_bf16_trains_and_evaluates(base_model, tmp_path):
    cfg = _cfg(base_model, tmp_path, method="partial", lr=1e-3)
    model = build_model(cfg, None)
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}  # frozen weights stay in the configured dtype
    params, optimizer, scheduler = _setup(model, cfg)
    precision = training_precision(cfg.model.dtype, torch.device("cpu"))
    list(optimizer_steps(model, _batches(1), cfg, device=torch.device("cpu"), optimizer=optimizer,
                         scheduler=scheduler, params=params, precision=precision))
    with precision.autocast():  # validation runs in the same autocast as training
        scores = evaluate_rows(model, load_for_eval(None, str(base_model))[1], get_task("classification"),
                               _read(4), LABELS)
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_head_rung_with_bf16_trains_evaluates_and_reloads(base_model, tmp_path):
    cfg = _cfg(base_model, tmp_path, method="head", lr=1e-2)
    cfg.task.name = "classification"
    model = build_model(cfg, len(LABELS))
    assert isinstance(model, HeadClassifier) and model.head.weight.dtype == torch.float32
    assert next(model.base.parameters()).dtype == torch.bfloat16
    params, optimizer, scheduler = _setup(model, cfg)
    precision = training_precision(cfg.model.dtype, torch.device("cpu"))
    list(optimizer_steps(model, _batches(1, labels_width=1), cfg, device=torch.device("cpu"), optimizer=optimizer,
                         scheduler=scheduler, params=params, precision=precision))
    tok = load_for_eval(None, str(base_model))[1]
    rows, task = _read(8), get_task("classification")
    scores = evaluate_rows(model, tok, task, rows, LABELS)  # outside autocast: the first evaluation
    assert 0.0 <= scores["accuracy"] <= 1.0
    save_artifact(model, tok, cfg, tmp_path / "head", LABELS)
    loaded, tok, info = load_for_eval(tmp_path / "head", str(base_model), "bfloat16", device="cpu")
    assert info["kind"] == "head" and next(loaded.base.parameters()).dtype == torch.bfloat16
    assert evaluate_rows(loaded, tok, task, rows, LABELS) == scores


def test_load_for_eval_uses_the_runs_dtype(base_model):
    model, _, info = load_for_eval(None, str(base_model), "bfloat16", device="cpu")
    assert info["kind"] == "base"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cpu"


def test_grad_accum_does_not_leak_partial_gradients_across_epochs(base_model, tmp_path):
    # 3 micro-batches with grad_accum=2: one optimizer step and one left-over micro-batch, whose
    # gradient must not be added into the next epoch's first step.
    cfg = _cfg(base_model, tmp_path, dtype="float32", grad_accum=2)
    model = build_model(cfg, None)
    params, optimizer, scheduler = _setup(model, cfg)
    precision = training_precision(cfg.model.dtype, torch.device("cpu"))
    steps = list(optimizer_steps(model, _batches(3), cfg, device=torch.device("cpu"), optimizer=optimizer,
                                 scheduler=scheduler, params=params, precision=precision))
    assert len(steps) == 1
    assert all(p.grad is None for p in params), "a partial accumulation survived the epoch"


def test_grad_accum_skips_the_all_reduce_on_micro_steps(base_model, tmp_path):
    cfg = _cfg(base_model, tmp_path, dtype="float32", grad_accum=2)
    model = build_model(cfg, None)
    synced: list[bool] = []

    class Recorder(torch.nn.Module):  # stands in for DDP: records which micro-steps skip the sync
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *a, **k):
            return self.module(*a, **k)

        @contextlib.contextmanager
        def no_sync(self):
            synced.append(False)
            yield

    wrapped = Recorder(model)
    params, optimizer, scheduler = _setup(wrapped, cfg)
    precision = training_precision(cfg.model.dtype, torch.device("cpu"))
    list(optimizer_steps(wrapped, _batches(4), cfg, device=torch.device("cpu"), optimizer=optimizer,
                         scheduler=scheduler, params=params, precision=precision))
    assert synced == [False, False]  # micro-steps 1 and 3 accumulate locally; 2 and 4 all-reduce


def test_zero_shot_and_feature_rungs_in_bf16(base_model, tmp_path):
    # The ladder's two rungs that train no torch weights, on their bf16 paths: zero_shot scores the base
    # loaded in bf16 (evaluate_artifact's path), feature fits on bf16 features (the Ray task's function,
    # called directly). few_shot is zero_shot's path with longer prompts.
    from lorafleet.data import read_split
    from lorafleet.train.feature import _fit_features

    rows, task = _read(8), get_task("classification")
    model, tok, _ = load_for_eval(None, str(base_model), "bfloat16")
    assert 0.0 <= evaluate_rows(model, tok, task, rows, LABELS)["accuracy"] <= 1.0
    cfg = _cfg(base_model, tmp_path, method="feature")
    cfg.task.name = "classification"
    train = [ex.row for ex in read_split("synthetic", task, "train", synthetic_n=24, seed=0)]
    metrics, trainable, total, files, measured = _fit_features(cfg.model_dump(mode="json"), train, rows, LABELS)
    assert set(metrics) == {"accuracy", "macro_f1"} and trainable > 0 and total > trainable
    assert {"feature.safetensors", "feature.json"} <= set(files) and measured["tokens_per_s"] > 0


@pytest.mark.slow
def test_lora_run_in_bf16_end_to_end(home, ray_local):
    # One Ray Train run on the bf16 path end to end (autocast steps, validation, checkpoint, the adapter
    # scored in bf16, registered), in-process on the session's Ray. It replaces a 4-rung bf16 ladder through
    # the CLI (137 s of the suite's time in a fresh `make test`, 2026-12-07): full, partial and head have
    # their own in-process bf16 tests above, and zero_shot and feature the one before this. Sizes are the
    # least that does: on a CPU without bf16 kernels (AVX2 only) a bf16 matmul is ~60x an fp32 one.
    from lorafleet.train.recipe import finetune

    raw = {"name": "bf16-tickets", "model": {"name_or_path": str(home / "models" / "tiny"), "dtype": "bfloat16"},
           "task": {"name": "classification"}, "method": {"name": "lora"},
           "train": {"max_steps": 10, "batch_size": 4, "eval_every": 10, "eval_samples": 8},
           "data": {"synthetic_sizes": {"train": 48, "validation": 8, "test": 8}}, "scaling": {"num_workers": 1}}
    summary = finetune(parse_config(raw, "test", home=home), registry_root=home / "registry", progress=False)
    assert summary.registered == "bf16-tickets@1" and summary.steps == 10
    assert set(summary.test_metrics) == {"accuracy", "macro_f1"}
    assert "dtype: bfloat16" in (Path(summary.run_dir) / "lorafleet-config.yaml").read_text()  # what workers read


def test_fsdp_full_step_in_bf16_keeps_fp32_master_weights(base_model, tmp_path):
    # One rank, gloo, no Ray: the FSDP2 model as a worker builds it, with its MixedPrecisionPolicy.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from helpers import free_port
    from lorafleet.train.fsdp import shard_model

    cfg = _cfg(base_model, tmp_path, dtype="bfloat16")
    cfg.scaling.strategy = "fsdp"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        device = torch.device("cpu")
        model = shard_model(cfg, device)
        gathered = []  # the dtype the forward sees: FSDP2 gathers the parameters in the compute dtype
        layer = next(m for n, m in model.named_modules() if n.endswith("up_proj"))
        layer.register_forward_pre_hook(lambda m, args: gathered.append(m.weight.dtype))
        before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        params, optimizer, scheduler = _setup(model, cfg)
        precision = training_precision(cfg.model.dtype, device, sharded=True)
        list(optimizer_steps(model, _batches(1), cfg, device=device, optimizer=optimizer, scheduler=scheduler,
                             params=params, precision=precision))
        assert gathered and set(gathered) == {torch.bfloat16}
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32
            if name.endswith("up_proj.weight"):
                assert (p.detach().full_tensor() != before[name]).float().mean().item() > 0.9
    finally:
        dist.destroy_process_group()


def test_label_probs_shares_the_prompt_and_equals_full_sequence_scoring(base_model):
    # The KV-cache sharing in evaluate.label_probs against the plain definition: one full sequence per
    # (prompt, label), summed log-probabilities of the label's tokens and EOS. Labels of 1 and several
    # tokens, one a prefix of another; prompts of different lengths (left padding); batch sizes that
    # split the rows unevenly.
    from lorafleet.data import prompt_ids, target_ids
    from lorafleet.evaluate import label_probs

    model, tok, _ = load_for_eval(None, str(base_model))
    labels = ["bill", "billing", "tech support", "account"]
    rows = _read(5)
    prompts = [prompt_ids(tok, get_task("classification").instruction(r)) for r in rows]
    assert len({len(p) for p in prompts}) > 1
    want = torch.zeros(len(prompts), len(labels))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, lab in enumerate(labels):
                t = target_ids(tok, lab)
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
                want[i, j] = logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)].sum()
    want = torch.softmax(want, -1)
    for batch_size in (4, 9, 32):
        assert torch.allclose(label_probs(model, tok, prompts, labels, batch_size=batch_size), want, atol=1e-5)

"""A model's answers and metrics on task rows: greedy generation for generative tasks, label
probabilities for classification (so the prediction is always one of the labels, as /v1/classify
answers), the loss for 'text'. The model is a transformers model (``eval.engine: hf``), a head, or an
:class:`~lorafleet.offline_engine.EngineModel` (``eval.engine: vllm``), which answers the same.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lorafleet.data import prompt_ids, target_ids
from lorafleet.offline_engine import EngineModel
from lorafleet.head import HeadClassifier, last_token_hidden
from lorafleet.tasks import Task

__all__ = ["generate", "label_probs", "predict", "evaluate_rows", "head_predict", "last_token_features", "lm_loss"]


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    return ids, mask


def _right_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and their attention mask for a batch of token-id lists."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy generation from token-id prompts; returns the decoded continuations.

    A sharded (FSDP2) model generates on every rank at once, each rank on the same prompts."""
    from torch.distributed.tensor import DTensor

    if isinstance(model, EngineModel):  # all prompts in one engine call: vLLM batches them itself
        return [tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in model.generate_ids(prompts, max_new_tokens)]

    model.eval()
    device = next(model.parameters()).device
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=sharded,  # every rank steps until all are done: each step gathers the weights
        )
        for row in gen[:, ids.shape[1] :]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def label_probs(
    model: nn.Module, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 32
) -> torch.Tensor:
    """P(label | prompt) for each prompt and label: softmax over the summed log-probabilities of
    each label's tokens followed by EOS (EOS keeps 'bill' from scoring as a prefix of 'billing').

    Each prompt runs once and its KV cache is shared by every label's continuation, so scoring costs
    about one prompt pass per row instead of one per (row, label): 4 labels on SmolLM2-135M, 40
    tickets, 2 CPU cores: 32 s as full sequences, 9 s shared (2026-12-05). ``batch_size`` bounds the (row, label)
    continuations per pass, as it bounded the full sequences before (same cache memory).
    """
    label_ids = [target_ids(tokenizer, lab) for lab in labels]
    if isinstance(model, EngineModel):
        return torch.softmax(torch.tensor(model.label_scores(prompts, label_ids)), dim=-1)
    model.eval()
    device = next(model.parameters()).device
    n_labels = len(label_ids)
    scores = torch.zeros(len(prompts), n_labels)
    rows_per_pass = max(1, batch_size // n_labels)
    for start in range(0, len(prompts), rows_per_pass):
        chunk = prompts[start : start + rows_per_pass]
        scores[start : start + len(chunk)] = _label_scores(model, tokenizer, chunk, label_ids, device)
    return torch.softmax(scores, dim=-1)


def _label_scores(model: nn.Module, tokenizer, prompts: list[list[int]], label_ids: list[list[int]],
                  device: torch.device) -> torch.Tensor:
    """Summed log-probabilities [rows, labels] of each label's tokens after each prompt.

    Prompts are left-padded with explicit position ids (each row's real tokens at 0..n-1, as if
    unpadded); continuations (each label's tokens but the last) are right-padded after them."""
    ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()  # [rows, vocab]: each label's first token
    n_rows, n_labels = len(prompts), len(label_ids)
    scores = torch.stack([first[:, lab[0]] for lab in label_ids], dim=1)
    width = max(len(lab) for lab in label_ids) - 1  # >= 1: every label ends with EOS
    cont = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for j, lab in enumerate(label_ids):
        cont[j, : len(lab) - 1] = torch.tensor(lab[:-1])
        cont_mask[j, : len(lab) - 1] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_labels)  # row r's cache at rows r*L .. r*L+L-1
    last = positions[:, -1:] + 1  # each row's next position
    cont_ids = cont.repeat(n_rows, 1)
    full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), cont_mask.repeat(n_rows, 1)], dim=1)
    cont_positions = (last + torch.arange(width)).repeat_interleave(n_labels, 0)
    logits = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                   position_ids=cont_positions.to(device), past_key_values=cache, use_cache=True).logits
    logprobs = torch.log_softmax(logits.float(), -1).cpu()  # [rows * labels, width, vocab]
    for j, lab in enumerate(label_ids):
        rest = torch.tensor(lab[1:])  # predicted at continuation positions 0 .. len-2
        scores[:, j] += logprobs[j::n_labels, torch.arange(len(rest))].gather(
            -1, rest.expand(n_rows, -1).unsqueeze(-1)).squeeze(-1).sum(-1)
    return scores


@torch.no_grad()
def _per_batch(model: nn.Module, pad_id: int, prompts: list[list[int]], batch_size: int,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(ids, mask)`` on right-padded batches of ``prompts`` on the model's device, as fp32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _right_pad(prompts[start : start + batch_size], pad_id)
        out.append(fn(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def head_predict(model: HeadClassifier, tokenizer, prompts: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Class probabilities from a classification head on a frozen model."""
    return _per_batch(model, tokenizer.pad_token_id, prompts, batch_size,
                      lambda ids, mask: torch.softmax(model(ids, mask).float(), -1))


def predict(model: nn.Module, tokenizer, task: Task, rows: list[dict[str, Any]], labels: list[str] | None = None) -> list[str]:
    """The model's answer for each row under the task's prompt contract."""
    prompts = [prompt_ids(tokenizer, task.instruction(r)) for r in rows]
    if isinstance(model, HeadClassifier):
        probs = head_predict(model, tokenizer, prompts)
        return [labels[i] for i in probs.argmax(-1).tolist()]
    if task.name == "classification":
        labs = list(labels or task.labels)
        probs = label_probs(model, tokenizer, prompts, labs)
        return [labs[i] for i in probs.argmax(-1).tolist()]
    return generate(model, tokenizer, prompts, task.max_new_tokens)


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean next-token loss over `texts` (the 'text' pre-training task's validation metric)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts[start : start + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids.to(device), attention_mask=(labels != -100).long().to(device), labels=labels.to(device)).loss) * n
        count += n
    return total / max(1, count)


def evaluate_rows(model: nn.Module, tokenizer, task: Task, rows: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, float]:
    """All of the task's metrics for `model` on `rows`."""
    if task.name == "text":
        return {"loss": lm_loss(model, tokenizer, [r["text"] for r in rows])}
    return task.score(predict(model, tokenizer, task, rows, labels), rows)


def last_token_features(model: nn.Module, tokenizer, prompts: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Frozen-model sentence features: the last token's final hidden state, fp32, on the CPU
    (the feature-based baseline). Computed on the model's device."""
    return _per_batch(model, tokenizer.pad_token_id, prompts, batch_size,
                      lambda ids, mask: last_token_hidden(model, ids, mask))

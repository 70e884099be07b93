"""Training throughput with and without sequence packing (`data.packing`), measured in one run.

    .venv/bin/python bench/packing.py [--model PATH] [--rows 48] [--batch-size 4] [--max-seq-len 512]
                                      [--seed 0] [--threads 2] [--passes 2]

Both modes train LoRA (lorafleet's default: r 8 on q/k/v/o, fp32) on the same variable-length chat rows
with lorafleet's own step loop (`lorafleet.train.steps.optimizer_steps`: forward, backward, clipping, AdamW,
LR schedule), one process, no Ray, for one pass over the rows:

* padded: `train.batch_size` rows per batch, padded to the batch's longest row (the run's Ray dataset pads
  every row to one width and `collate` trims each batch to its longest row, as here);
* packed: the same rows in blocks of `data.max_seq_len` tokens (`lorafleet.train.packing`, best-fit
  decreasing), `train.batch_size` blocks per batch, attention kept inside each row (sdpa: a 4D block mask).

The rows are chats of 1 to 4 user/assistant exchanges drawn from the synthetic instruction, qa and
summarization tasks, rendered with the model's chat template, the loss on the assistant turns (what
`lorafleet.data.encode_rows` does for `messages` rows). Throughput is answer tokens per second: the
tokens that carry loss (each row's assistant turns), counted once per pass whatever the padding. Each
mode first takes one untimed step (a warm-up on its first batch), then `--passes` timed passes, each from
the same initial LoRA weights; the fastest pass counts. The ratio packed / padded is the speed-up. Numbers depend on the machine and its load;
the 1-minute load average before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lorafleet.base_model import load_tokenizer
from lorafleet.config.finetune import parse_config
from lorafleet.data import IGNORE_INDEX, Example, encode_rows
from lorafleet.tasks import get_task
from lorafleet.train.dataset import build_scheduler, collate
from lorafleet.train.packing import packed_blocks
from lorafleet.train.precision import training_precision
from lorafleet.train.steps import build_model, optimizer_steps

HOME = Path(os.environ.get("LORAFLEET_HOME", ".lorafleet"))


def chat_rows(n: int, seed: int) -> list[Example]:
    """`n` chats of 1-4 exchanges, each a synthetic instruction, qa or summarization prompt and its answer."""
    rng = random.Random(seed)
    pools = {name: get_task(name).synthetic("train", 200, seed=seed) for name in ("instruction", "qa", "summarization")}
    rows = []
    for i in range(n):
        messages = []
        for _ in range(rng.randint(1, 4)):
            task = get_task(rng.choice(list(pools)))
            row = rng.choice(pools[task.name])
            messages += [{"role": "user", "content": task.instruction(row).strip()},
                         {"role": "assistant", "content": task.target(row)}]
        rows.append(Example({"messages": messages}, f"bench:{i}"))
    return rows


def padded_batches(encoded: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Batches as a run's padded dataset gives them: every row padded to one width, `collate` trims each."""
    width = max(len(r["input_ids"]) for r in encoded)
    out = []
    for start in range(0, len(encoded) - batch_size + 1, batch_size):
        rows = encoded[start:start + batch_size]
        pad = [width - len(r["input_ids"]) for r in rows]
        out.append(collate({
            "input_ids": np.array([r["input_ids"] + [pad_id] * p for r, p in zip(rows, pad)]),
            "attention_mask": np.array([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)]),
            "labels": np.array([r["labels"] + [IGNORE_INDEX] * p for r, p in zip(rows, pad)]),
        }))
    return out


def packed_batches(encoded: list[dict[str, list[int]]], batch_size: int, max_seq_len: int, pad_id: int):
    blocks = packed_blocks(encoded, max_seq_len, pad_id)
    random.Random(0).shuffle(blocks)  # best-fit decreasing fills blocks longest rows first; a run shuffles them
    return [collate({k: np.stack([b[k] for b in blocks[s:s + batch_size]]) for k in blocks[0]})
            for s in range(0, len(blocks), batch_size)]


def run(cfg, batches: list[dict[str, torch.Tensor]], passes: int) -> tuple[float, int, int]:
    """(seconds of the fastest of `passes` passes, answer tokens, token positions computed per pass), after
    one untimed warm-up step; every pass starts from the same LoRA weights."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    cpu = torch.device("cpu")

    def steps(batches_):
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        return optimizer_steps(model, batches_, cfg, device=cpu, optimizer=optimizer,
                               scheduler=build_scheduler(optimizer, cfg), params=params,
                               precision=training_precision("float32", cpu))

    list(steps(batches[:1]))  # warm-up: allocator, kernels
    times = []
    for _ in range(passes):
        model.load_state_dict(state, strict=False)  # back to the same initial LoRA weights
        started = time.perf_counter()
        for _ in steps(batches):
            pass
        times.append(time.perf_counter() - started)
    seconds = min(times)  # the pass least disturbed by other work on the machine
    answer = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)
    return seconds, answer, positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(HOME / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2, help="timed passes per mode; the fastest counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    base = {"model": {"name_or_path": args.model}, "task": {"name": "instruction"},
            "data": {"max_seq_len": args.max_seq_len},
            "train": {"batch_size": args.batch_size, "max_steps": 1000, "warmup_steps": 0, "lr": 1e-4,
                      "seed": args.seed}}
    cfg = parse_config(base, home=HOME)
    tok = load_tokenizer(args.model)
    encoded = encode_rows(tok, get_task("instruction"), chat_rows(args.rows, args.seed), args.max_seq_len, truncate="left")
    n_rows = len(encoded) - len(encoded) % args.batch_size  # whole padded batches; the same rows both ways
    encoded = encoded[:n_rows]
    lengths = sorted(len(r["input_ids"]) for r in encoded)

    batches = {"padded": padded_batches(encoded, args.batch_size, tok.pad_token_id),
               "packed": packed_batches(encoded, args.batch_size, args.max_seq_len, tok.pad_token_id)}
    results = {mode: run(cfg, b, args.passes) for mode, b in batches.items()}
    print(f"bench/packing.py  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"model {args.model}  |  LoRA r={cfg.method.lora.r} {cfg.method.lora.target_modules}, fp32, sdpa  |  "
          f"{n_rows} chat rows, {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]})  |  "
          f"batch_size {args.batch_size}, max_seq_len {args.max_seq_len}")
    print(f"{'mode':8} {'steps':>5} {'best s':>8} {'answer tok':>10} {'positions':>9} {'padding':>7} {'answer tok/s':>12}")
    real = sum(len(r["input_ids"]) for r in encoded)
    for mode, (seconds, answer, positions) in results.items():
        print(f"{mode:8} {len(batches[mode]):>5} {seconds:>8.1f} {answer:>10} {positions:>9} "
              f"{1 - real / positions:>7.1%} {answer / seconds:>12.1f}")
    (t_pad, a_pad, *_), (t_pack, a_pack, *_) = results["padded"], results["packed"]
    assert a_pad == a_pack, "both modes must train on the same answer tokens"
    print(f"packed / padded answer tokens per second: {(a_pack / t_pack) / (a_pad / t_pad):.2f}x  |  "
          f"load avg 1 min: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

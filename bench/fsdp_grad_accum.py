"""What gradient accumulation under FSDP2 keeps on each rank, counted from the tensors (issue 30 item 3).

    .venv/bin/python bench/fsdp_grad_accum.py [--model PATH] [--method full|lora]

Two ranks over gloo (torch.multiprocessing, no Ray), the model sharded as a lorafleet worker shards it
(`lorafleet.train.fsdp.shard_model`), one micro-batch backward, then the gradient bytes each rank holds until
the next micro-step, for the two ways FSDP2 can accumulate:

* `sync every micro-step` (what lorafleet does, `lorafleet.train.steps.optimizer_steps`): each micro-step's
  gradients are reduce-scattered at once, so a rank keeps only its fp32 gradient shards (1/N of the model),
  at the cost of one reduce-scatter per micro-step;
* `set_requires_gradient_sync(False)` on the micro-steps before the last (FSDP1's `no_sync`): no communication
  until the last one, but every rank keeps the *unsharded* gradient of every weight in between.

Bytes are counted from the sharded gradients (`p.grad.to_local()`) and from FSDP2's unsharded gradient buffers
(`FSDPParam.unsharded_param.grad` / `unsharded_accumulated_grad`), so the figures do not depend on the
allocator. Printed as one table; the ratio is no-sync / sync.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def _grad_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(sharded gradient bytes, unsharded gradient bytes) this rank holds."""
    from torch.distributed.tensor import DTensor

    sharded = 0
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sharded += g.numel() * g.element_size()
    unsharded, seen = 0, set()
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        for group in (state()._fsdp_param_groups if state else []):
            for fp in group.fsdp_params:
                for t in (getattr(fp, "unsharded_accumulated_grad", None),
                          getattr(getattr(fp, "_unsharded_param", None), "grad", None)):
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        unsharded += t.numel() * t.element_size()
    return sharded, unsharded


def _rank(rank: int, world: int, port: int, model_path: str, method: str, out: str) -> None:
    import torch.distributed as dist

    from lorafleet.config import parse_config
    from lorafleet.train.fsdp import shard_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = parse_config({"model": {"name_or_path": model_path}, "method": {"name": method},
                        "scaling": {"strategy": "fsdp", "num_workers": world}}, home=Path(out))
    ids = torch.randint(10, 1000, (2, 32), generator=torch.Generator().manual_seed(rank))
    result = {}
    for mode in ("sync every micro-step", "set_requires_gradient_sync(False)"):
        model = shard_model(cfg, torch.device("cpu"))
        model.set_requires_gradient_sync(mode.startswith("sync"))
        model(input_ids=ids, labels=ids).loss.backward()  # micro-step 1 of 2
        sharded, unsharded = _grad_bytes(model)
        params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters() if p.requires_grad)
        result[mode] = {"sharded_grad_bytes": sharded, "unsharded_grad_bytes": unsharded, "trainable_shard_bytes": params}
        del model
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    home = Path(os.environ.get("LORAFLEET_HOME", REPO / ".lorafleet"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(home / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    args = ap.parse_args()
    from lorafleet.cluster import free_port  # the project's port picker (outside the ephemeral range)

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, free_port(), args.model, args.method, out), nprocs=2)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    print(f"{Path(args.model).name}, {args.method}, 2 ranks, after micro-step 1 of 2 (bytes of gradients a rank holds)")
    print(f"{'mode':36} {'rank':>4} {'sharded grads':>15} {'unsharded grads':>16} {'total':>15}")
    totals = {}
    for r, result in enumerate(ranks):
        for mode, b in result.items():
            total = b["sharded_grad_bytes"] + b["unsharded_grad_bytes"]
            totals.setdefault(mode, []).append(total)
            print(f"{mode:36} {r:>4} {b['sharded_grad_bytes']:>15,} {b['unsharded_grad_bytes']:>16,} {total:>15,}")
    sync, nosync = (max(v) for v in totals.values())
    print(f"no-sync / sync, gradient bytes a rank holds between micro-steps: {nosync / sync:.2f}")


if __name__ == "__main__":
    main()

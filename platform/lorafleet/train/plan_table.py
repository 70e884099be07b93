"""What fits where: for each model and method, the fewest GPUs of each size a training run needs, by the
planner's formulas (`lorafleet.train.plan`), at one config's batch, sequence length and settings.
`lorafleet plan CONFIG --fits` prints it; docs/SCALING.md holds its output for Llama-3.1 8B and 70B."""

from __future__ import annotations

from pathlib import Path

from lorafleet.config import FinetuneConfig
from lorafleet.train.clusters import GPU_MEMORY, GiB
from lorafleet.train.memory import ModelShape, device_bytes, model_shape, training_parts, with_sets

__all__ = ["fits_table", "fewest_gpus"]

TABLE_GPUS = ("A10G", "A100-40G", "H100")
WORKERS = (1, 2, 4, 8, 16, 32, 64)


def fewest_gpus(cfg: FinetuneConfig, shape: ModelShape, memory: int) -> tuple[int, str, int] | None:
    """(workers, strategy, bytes a GPU) of the smallest run of `cfg` that fits GPUs of `memory` bytes:
    one unsharded worker if it fits, else FSDP2 over 2, 4, ... 64; None if even 64 do not. QLoRA's 4-bit base
    is not sharded: one GPU holds it or none does."""
    quantized = cfg.method.name == "lora" and cfg.method.lora.quantize != "none"
    for workers in WORKERS[:1] if quantized else WORKERS:
        strategy = "ddp" if workers == 1 else "fsdp"
        sets = [f"scaling.num_workers={workers}", f"scaling.strategy={strategy}", "scaling.use_gpu=true",
                "scaling.cpu_offload=false"]
        need = device_bytes(training_parts(with_sets(cfg, sets), shape, True))
        if need <= memory:
            return workers, strategy, need
    return None


def fits_table(cfg: FinetuneConfig, model_configs: list[str | Path | None],
               methods: tuple[str, ...] = ("lora", "qlora", "partial", "full"), gpus: tuple[str, ...] = TABLE_GPUS) -> str:
    """A markdown table: model x method -> the fewest GPUs of each type (and the GiB each holds)."""
    t, lora = cfg.train, cfg.method.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else "+".join(lora.target_modules)
    head = (f"batch {t.batch_size} x {cfg.data.max_seq_len} tokens a worker, {cfg.model.dtype}, gradient checkpointing "
            f"{'on' if t.grad_checkpointing else 'off'}; lora r={lora.r} on {targets}; partial: last "
            f"{cfg.method.partial_layers} block(s) + output layer; qlora: that LoRA on an NF4 base (one GPU or none). A "
            "cell: the fewest GPUs of that kind (1: unsharded, more: FSDP2) and the GiB each holds")
    lines = [head, "", "| model | parameters | method | trainable | " + " | ".join(
        f"{g} {GPU_MEMORY[g] / GiB:.1f} GiB" for g in gpus) + " |", "|---" * (4 + len(gpus)) + "|"]
    for model_config in model_configs:
        for method in methods:
            c = with_sets(cfg, ["method.name=lora", "method.lora.quantize=nf4"] if method == "qlora"
                          else [f"method.name={method}", "method.lora.quantize=none"])
            shape = model_shape(c, model_config)
            cells = []
            for g in gpus:
                best = fewest_gpus(c, shape, GPU_MEMORY[g])
                none = "not on one" if method == "qlora" else "> 64"
                cells.append(none if best is None else f"{best[0]} ({best[2] / GiB:.1f} GiB)")
            lines.append(f"| {shape.name} | {shape.params / 1e9:.2f} B | {method} | {shape.trainable / 1e9:.3f} B | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)

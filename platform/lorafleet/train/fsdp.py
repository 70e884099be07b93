"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): building, checkpointing and
exporting a model no rank holds whole.

* **Build.** Every rank builds the model on the meta device from its config (`base_model.model_skeleton`:
  no weights, no memory) with the method applied, shards it one transformer block at a time, and then
  receives its shards of rank 0's weights (`set_model_state_dict(..., broadcast_from_rank0=True)`,
  tensor by tensor). Only rank 0 reads the weights, once, into host RAM in `model.dtype`: one full copy
  per run, not one per rank, and never one on any device. The other choice, each rank reading its own
  slices from the safetensors files, saves rank 0's copy but needs the checkpoint's tensor layout to
  match the sharding (and LoRA's fresh weights have no file); broadcasting also gives every method the
  exact initial weights of the DDP run with the same seed (the equality tests rely on it).
* **Precision.** `MixedPrecisionPolicy`: parameters gathered in the compute dtype, gradients reduced in
  fp32, the sharded master weights fp32 for what trains (`precision.keep_trainable_fp32`). Optional
  `CPUOffloadPolicy` (`scaling.cpu_offload`).
* **Checkpoints.** `torch.distributed.checkpoint` (DCP): every rank writes its own shard of the trainable
  weights and of the optimizer state (`__<rank>_0.distcp`, rank 0 also `.metadata`); the frozen base is
  not written (it is the base model). Resume reads each rank's part back. The registered artifact is
  exported once, at the end, from the best checkpoint (`checkpoint.export_shards`), in the run's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lorafleet.config import FinetuneConfig

__all__ = ["SHARDS_DIR", "is_sharded", "load_shards", "save_shards", "shard_model"]

SHARDS_DIR = "shards"  # inside a checkpoint of a sharded run: the DCP files of every rank

_OPTIONS_SAVE = dict(ignore_frozen_params=True)  # the frozen base is the base model: never written


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """The model to train, sharded over every rank (see the module docstring). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from lorafleet.train.methods import decoder_layers
    from lorafleet.train.precision import compute_dtype
    from lorafleet.train.steps import build_model

    rank = dist.get_rank()
    full_state: dict[str, torch.Tensor] = {}
    if rank == 0:  # the one full copy, in host RAM; its initial LoRA weights are the DDP run's (same seed)
        full_state = build_model(cfg, None).state_dict()
    rng = [torch.get_rng_state()]
    dist.broadcast_object_list(rng, src=0)  # every rank continues from rank 0's generator, as after a real build
    model = build_model(cfg, None, skeleton=True)
    torch.set_rng_state(rng[0])

    compute = compute_dtype(cfg.model.dtype, device)
    policy = {
        "mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
        "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cfg.scaling.cpu_offload else OffloadPolicy(),
    }
    for block in decoder_layers(model):  # one all-gather per transformer block
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # loading assigned the input and output embeddings separate tensors (SmolLM2 ties them)
    _buffers_to(model, device)
    return model


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers (built real on the CPU by the skeleton) to the training device."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, out: Path) -> None:
    """Every rank writes its shards of the trainable weights and the optimizer state to `out` (its own
    local folder: Ray Train uploads every rank's folder into the same checkpoint). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS_SAVE))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out))


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, shards: Path) -> None:
    """Every rank reads its own part of a checkpoint's shards back into `model` and `optimizer`. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(**_OPTIONS_SAVE)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(shards))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(**_OPTIONS_SAVE, strict=False))

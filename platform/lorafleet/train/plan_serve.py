"""The memory planner for serving: what one vLLM engine replica of a serve config holds on its GPU.

vLLM takes ``gpu_memory_utilization`` of the GPU (engine_kwargs; 0.9 by default), loads the weights,
reserves its LoRA slots, profiles one forward of ``max_num_batched_tokens`` and gives the rest to the
KV cache; it refuses to start when the rest cannot hold one ``max_model_len`` sequence. Per replica
(estimates, d = bytes of the serve dtype):

  weights        parameters x d (counted from the meta-device model, as for training)
  LoRA slots     max_loras x max_lora_rank x layers x (9 h + 2 kv + 3 i) x d: A and B of every LoRA-capable
                 linear of a Llama block (q/k/v, o, gate/up, down), whatever modules an adapter targets
  activations    max_num_batched_tokens x d x (11 h + 2 kv + 4 i) (one layer's working set) + the
                 sampler's fp32 logits of max_num_seqs rows
  runtime        1 GiB: CUDA context, CUDA graphs, workspaces
  KV cache       2 (K and V) x layers x kv x d per token; at least max_model_len tokens must fit
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.config import FinetuneConfig
from lorafleet.config.serve import ServeSettings
from lorafleet.train.clusters import Bundle, Cluster, gib, placement_problems
from lorafleet.train.memory import DTYPE_BYTES, RUNTIME_BYTES, Part, model_shape
from lorafleet.train.plan import Plan, gpu_nodes

__all__ = ["plan_serving"]

_VLLM_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
_VLLM_BATCHED_TOKENS = 8192  # vLLM's default max_num_batched_tokens (chunked prefill)
_VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs


def plan_serving(settings: ServeSettings, cluster: Cluster | None = None, *,
                 model_config: str | Path | None = None, label: str = "serve", strict: bool = False) -> Plan:
    """What one engine replica of `settings` holds and asks for, checked against `cluster` when given
    (`strict`: a base model without a config.json here is an error, else a note)."""
    on_gpu = settings.accelerator == "gpu"
    ek = settings.engine_kwargs
    plan = Plan(label, f"{settings.max_replicas()} engine replica(s), {settings.dtype}, max_model_len "
                f"{settings.max_model_len}, {settings.max_loras} LoRA slots of rank {settings.max_lora_rank} - "
                f"{settings.base_model}", "GPU" if on_gpu else "CPU", Bundle(1, 1 if on_gpu else 0),
                settings.max_replicas())
    dtype = settings.dtype if settings.dtype in DTYPE_BYTES else "bfloat16"
    base = FinetuneConfig.model_validate({"model": {"name_or_path": settings.base_model_path(), "dtype": dtype}})
    try:
        shape = model_shape(base, model_config, method=False)
    except OSError as err:
        if strict:
            raise
        plan.notes.append(f"memory not planned: {err}")
        shape = None
    if shape is not None:
        d = DTYPE_BYTES[dtype]
        h, kv, i, L = shape.hidden, shape.kv, shape.intermediate, shape.layers
        tokens = int(ek.get("max_num_batched_tokens", max(settings.max_model_len, _VLLM_BATCHED_TOKENS)))
        seqs = int(ek.get("max_num_seqs", _VLLM_MAX_SEQS))
        slot = settings.max_lora_rank * L * (9 * h + 2 * kv + 3 * i) * d
        per_token = 2 * L * kv * d
        plan.parts = [
            Part("weights", shape.params * d, f"{shape.params:,} x {d} B"),
            Part("LoRA slots", settings.max_loras * slot, f"{settings.max_loras} slots x {slot / 2**20:.0f} MiB"),
            Part("activations", tokens * d * (11 * h + 2 * kv + 4 * i) + seqs * shape.vocab * 4,
                 f"{tokens} batched tokens x {d * (11 * h + 2 * kv + 4 * i):,} B + {seqs} x {shape.vocab:,} x 4 B"),
            Part("KV cache, one sequence", settings.max_model_len * per_token,
                 f"{settings.max_model_len} tokens x {per_token:,} B (2 x {L} layers x {kv} x {d} B)"),
        ]
        if on_gpu:
            plan.parts.append(Part("runtime", RUNTIME_BYTES, "CUDA context, CUDA graphs, workspaces"))
        else:
            plan.notes.append(f"CPU: the KV cache is VLLM_CPU_KVCACHE_SPACE = kv_cache_gib = {settings.kv_cache_gib} GiB")
    if cluster is not None:
        plan.checked_on = cluster.source
        plan.problems += [f"placement: {p}" for p in placement_problems(plan.bundle, plan.count, cluster)]
        if plan.problems:
            plan.fixes.append("fewer num_replicas (autoscaling.max_replicas), or a cluster with more GPUs")
        if shape is not None and on_gpu:
            _check_memory(plan, cluster, float(ek.get("gpu_memory_utilization", _VLLM_UTILIZATION)), per_token,
                          settings.max_model_len)
    return plan


def _check_memory(plan: Plan, cluster: Cluster, utilization: float, per_token: int, max_len: int) -> None:
    """The KV cache left on each GPU a replica may get, in full-length sequences; a problem if not one fits."""
    hosts = [n for n in gpu_nodes(plan.bundle, cluster) if n.gpu_memory]
    if not hosts:
        plan.notes.append(f"GPU memory of {cluster.source} not known: pass --gpu-memory SIZE to check it")
    one_seq = max_len * per_token
    for n in hosts:
        budget = int(utilization * n.gpu_memory)
        left = budget - (plan.device_bytes - one_seq)
        if left < one_seq:
            plan.problems.append(f"memory: {gib(plan.device_bytes)} needed, {utilization:g} x {n.name}'s "
                                 f"{gib(n.gpu_memory)} = {gib(budget)}: vLLM would not start (no room for one "
                                 f"{max_len}-token sequence's KV cache)")
            plan.fixes.append(f"fewer max_loras or a lower max_lora_rank / max_model_len, a higher "
                              "engine_kwargs.gpu_memory_utilization, or GPUs with at least "
                              f"{gib(plan.device_bytes / utilization)}")
        else:
            plan.notes.append(f"on {n.name}: {gib(left)} of KV cache = {left // one_seq} sequences of "
                              f"{max_len} tokens ({left // per_token:,} tokens)")

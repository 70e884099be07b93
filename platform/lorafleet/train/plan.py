"""The memory planner: what one training worker holds on its device (`lorafleet.train.memory`: the
formulas), what it asks of Ray, and whether a cluster can place and hold it, with the changes that would
make it fit. `lorafleet plan` prints it; `train`, `sweep` and `compare` refuse what it says cannot be
placed or fit (`PlanError`, exit 2) before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.config import FinetuneConfig
from lorafleet.train.clusters import GiB, Bundle, Cluster, NodeType, capacity, gib, placement_problems
from lorafleet.train.memory import (
    DTYPE_BYTES,
    ModelShape,
    Part,
    device_bytes,
    inference_parts,
    model_shape,
    training_parts,
    with_sets,
)

__all__ = ["Plan", "PlanError", "check_plans", "format_plan", "gpu_nodes", "plan_configs", "plan_training",
           "refuse_misfits"]

SHARDABLE = ("full", "partial", "lora")


class PlanError(RuntimeError):
    """A run, sweep trial, ladder rung or serve application that the cluster cannot place or hold."""


@dataclass
class Plan:
    """What one worker (or replica) of a run holds and asks for, and what a cluster says to it."""

    label: str
    summary: str
    device: str  # "GPU" or "CPU"
    bundle: Bundle
    count: int
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    checked_on: str | None = None

    @property
    def device_bytes(self) -> int:
        return device_bytes(self.parts)

    @property
    def host_bytes(self) -> int:
        return sum(p.bytes for p in self.parts if p.counted and p.host)


def plan_training(cfg: FinetuneConfig, cluster: Cluster | None = None, *, label: str | None = None,
                  inference: bool = False, model_config: str | Path | None = None, memory: bool = True,
                  strict: bool = False) -> Plan:
    """What one worker of `cfg` holds and asks for, checked against `cluster` when one is given.

    Args:
        inference: plan one process holding the base (a prompt rung; a `feature` run is one anyway).
        memory: count the memory (a meta-device build); False: placement only.
        strict: a model that cannot be built on the meta device (no config.json here) is an error; else
            a note, and only placement is checked (the pre-flight check never refuses on a guess).
    """
    s, on_gpu = cfg.scaling, cfg.scaling.use_gpu
    inference = inference or cfg.method.name == "feature"
    what = "one process (inference)" if inference else f"{cfg.method.name} ({s.strategy}) on {s.num_workers} workers"
    plan = Plan(label or cfg.name, f"{what}, {cfg.model.dtype}, {'GPU' if on_gpu else 'CPU'} - {cfg.model.name_or_path}",
                "GPU" if on_gpu else "CPU", Bundle(s.cpus_per_worker, 1 if on_gpu else 0, s.accelerator_type),
                1 if inference else s.num_workers)
    shape = None
    if memory:
        try:
            shape = model_shape(cfg, model_config, method=not inference)
        except Exception as err:  # noqa: BLE001 - not strict: a model the planner cannot build is not refused
            if strict:
                raise
            plan.notes.append(f"memory not planned: {type(err).__name__}: {err}")
        else:
            plan.parts = (inference_parts if inference else training_parts)(cfg, shape, on_gpu)
            plan.summary += f"; {shape.params:,} parameters, {shape.trainable if not inference else 0:,} trainable"
    if cluster is not None:
        _check(plan, cluster, cfg, shape if not inference else None)
    return plan


def _check(plan: Plan, cluster: Cluster, cfg: FinetuneConfig, shape: ModelShape | None) -> None:
    """Placement and memory of `plan` on `cluster`: problems, and the fixes that would make it fit."""
    plan.checked_on = cluster.source
    placement = placement_problems(plan.bundle, plan.count, cluster)
    plan.problems += [f"placement: {p}" for p in placement]
    if placement:
        plan.fixes += _placement_fixes(plan.bundle, cluster)
    if not plan.parts or plan.device != "GPU":
        return
    known = [n for n in gpu_nodes(plan.bundle, cluster) if n.gpu_memory]
    if not known:
        plan.notes.append(f"GPU memory of {cluster.source} not known: pass --gpu-memory SIZE to check it")
    need = plan.device_bytes
    short = [n for n in known if need > n.gpu_memory]
    for n in short:
        plan.problems.append(f"memory: {gib(need)} a GPU needed, {n.name} has {gib(n.gpu_memory)}"
                             + (f" ({n.gpu_type})" if n.gpu_type else ""))
    if short and shape is not None:
        plan.fixes += _memory_fixes(cfg, shape, min(n.gpu_memory for n in short))
    if short:
        plan.fixes.append(f"GPUs with at least {gib(need)}")
    if shape is not None:
        _check_host(plan, cluster, cfg, shape)


def _check_host(plan: Plan, cluster: Cluster, cfg: FinetuneConfig, shape: ModelShape) -> None:
    """A node's host memory: its ranks' offloaded shards (cpu_offload) and the weights read at the start
    (FSDP2: rank 0's one full copy, broadcast from there; DDP: every rank loads the whole model, then moves
    it to its GPU)."""
    copy = shape.params * DTYPE_BYTES[cfg.model.dtype]
    for n in (n for n in gpu_nodes(plan.bundle, cluster) if n.host_memory):
        ranks = min(plan.count, plan.bundle.per_node(n) or plan.count)
        loads = 1 if cfg.scaling.strategy == "fsdp" else ranks
        need = ranks * plan.host_bytes + loads * copy
        if need > n.host_memory:
            plan.problems.append(f"host memory: {gib(need)} on a node ({ranks} ranks x {gib(plan.host_bytes)} "
                                 f"offloaded + {loads} x {gib(copy)} of weights read), {n.name} has {gib(n.host_memory)}")
            plan.fixes.append("more scaling.num_workers (smaller shards), or nodes with more memory")


def gpu_nodes(bundle: Bundle, cluster: Cluster) -> list[NodeType]:
    """The node types whose GPUs a bundle may get: those that can hold it, else (it cannot be placed) every
    node type with its GPU type, so that memory is still checked."""
    hosts = [n for n in cluster.node_types if bundle.per_node(n) != 0]
    return hosts or [n for n in cluster.node_types if n.gpus >= bundle.gpus > 0
                     and bundle.accelerator_type in (None, n.gpu_type)]


def _placement_fixes(bundle: Bundle, cluster: Cluster) -> list[str]:
    """What to change so that the workers can be placed: CPUs, GPU type, or how many."""
    most = capacity(bundle, cluster)
    if most:
        return [f"--set scaling.num_workers={most}, or a cluster with more nodes"]
    with_gpus = gpu_nodes(bundle, cluster) if bundle.gpus else list(cluster.node_types)
    types = sorted({n.gpu_type for n in cluster.node_types if n.gpu_type})
    if bundle.gpus and not with_gpus and bundle.accelerator_type and types:
        return [f"--set scaling.accelerator_type=<one of {types}>, or a cluster with {bundle.accelerator_type} nodes"]
    if bundle.gpus and not with_gpus:
        return ["--set scaling.use_gpu=false, or a cluster with GPU nodes"]
    cpus = [n.cpus for n in with_gpus if n.cpus]
    return [f"--set scaling.cpus_per_worker={max(cpus):g}"] if cpus else []


def _memory_fixes(cfg: FinetuneConfig, shape: ModelShape, limit: int) -> list[str]:
    """Single changes to `cfg` that would bring a worker under `limit` bytes: the first that fits of each kind."""
    t, s = cfg.train, cfg.scaling
    kinds: list[list[list[str]]] = [[["train.grad_checkpointing=true"]] if not t.grad_checkpointing else []]
    kinds.append([[f"train.batch_size={b}", f"train.grad_accum={t.grad_accum * t.batch_size // b}"]
                  for b in (t.batch_size // 2 ** k for k in range(1, 8)) if b >= 1 and t.batch_size % b == 0])
    if cfg.method.name in SHARDABLE:
        kinds.append([["scaling.strategy=fsdp", f"scaling.num_workers={w}"] for w in (2, 4, 8, 16, 32, 64)
                      if w > s.num_workers or (w == s.num_workers and s.strategy != "fsdp")])
        kinds.append([["scaling.strategy=fsdp", "scaling.cpu_offload=true"]] if not s.cpu_offload else [])
    fixes = []
    for tries in kinds:
        for sets in tries:
            need = device_bytes(training_parts(with_sets(cfg, sets), shape, True))
            if need <= limit:
                fixes.append(" ".join(f"--set {x}" for x in sets) + f" ({gib(need)} a GPU)")
                break
    return fixes


def format_plan(plan: Plan) -> str:
    """The plan as a table: each part per device, the total, the bundle, notes, problems and fixes."""
    lines = [f"{plan.label}: {plan.summary}"]
    if plan.parts:
        lines.append(f"  {'per ' + plan.device + ' (estimate)':<32}{'GiB':>8}  how")
        for p in plan.parts:
            how = p.formula if p.counted else f"[not counted] {p.formula}"
            lines.append(f"  {p.name + (' [host]' if p.host else ''):<32}{p.bytes / GiB:>8.2f}  {how}")
        lines.append(f"  {'total on one ' + plan.device:<32}{plan.device_bytes / GiB:>8.2f}"
                     + (f"  + {gib(plan.host_bytes)} host memory a rank" if plan.host_bytes else ""))
    lines.append(f"  asks Ray for {plan.count} x {plan.bundle.describe()}")
    lines += [f"  note: {n}" for n in plan.notes] + [f"  problem: {p}" for p in plan.problems]
    lines += [f"  fix: {f}" for f in plan.fixes]
    if plan.checked_on:
        lines.append(f"  -> {'refused' if plan.problems else 'fits and can be placed'} on {plan.checked_on}")
    return "\n".join(lines)


def check_plans(plans: list[Plan], what: str, *, tables: bool = True) -> None:
    """Raise PlanError naming every plan that has a problem: with its table (`tables`), else its problems
    and fixes only (the caller printed the tables)."""
    bad = [p for p in plans if p.problems]
    if not bad:
        return
    if tables:
        detail = "\n".join(format_plan(p) for p in bad)
    else:
        detail = "\n".join(f"{p.label}: " + "; ".join(p.problems + [f"fix: {f}" for f in p.fixes]) for p in bad)
    raise PlanError(f"{what} cannot be placed or cannot fit on {bad[0].checked_on}; nothing was started:\n{detail}")


def plan_configs(cfgs: dict[str, FinetuneConfig], cluster: Cluster | None, *, inference: tuple[str, ...] = (),
                 model_config: str | Path | None = None, memory: bool | None = None, strict: bool = False) -> list[Plan]:
    """A plan per labelled config (`inference`: the labels that are prompt rungs); ``memory=None``: planned
    for GPU runs only (a CPU run's memory is its host's)."""
    return [plan_training(cfg, cluster, label=label, inference=label in inference, model_config=model_config,
                          memory=cfg.scaling.use_gpu if memory is None else memory, strict=strict)
            for label, cfg in cfgs.items()]


def refuse_misfits(cfgs: dict[str, FinetuneConfig], cluster: Cluster | None, what: str, *,
                   inference: tuple[str, ...] = ()) -> None:
    """Refuse (PlanError) any of `cfgs` that `cluster` cannot place or hold; with no cluster nothing is known
    and nothing is checked. A CPU run's placement only (its memory is the host's, not planned)."""
    if cluster is not None:
        check_plans(plan_configs(cfgs, cluster, inference=inference), what)

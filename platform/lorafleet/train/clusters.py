"""Where workers can go: the node types of a Ray cluster and whether equal bundles fit on them.

A `Cluster` comes from a cluster file (the Ray cluster launcher's ``available_node_types``, or a KubeRay
RayCluster / RayJob / RayService: its head and worker groups), from ``--gpus N --gpu-memory SIZE``, or
from the Ray cluster this process is connected to (`running_cluster`). What an instance type holds comes
from a small table of the types the shipped files use (`INSTANCE_TYPES`); a GPU's memory from Ray's name
for it (`GPU_MEMORY`). `placement_problems` says whether ``count`` bundles (Ray Train's workers, engine
replicas) can be placed at once. Nothing here needs Ray except `running_cluster`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorafleet.config import ConfigError, read_yaml

__all__ = ["GPU_MEMORY", "INSTANCE_TYPES", "Bundle", "Cluster", "NodeType", "capacity", "flag_cluster", "gib",
           "parse_size", "placement_problems", "read_cluster", "running_cluster", "with_gpu_memory"]

MiB, GiB = 2**20, 2**30

# Ray's accelerator type -> the device memory CUDA reports for it (nvidia-smi's total), bytes.
GPU_MEMORY: dict[str, int] = {
    "T4": 15360 * MiB, "A10G": 23028 * MiB, "L4": 23034 * MiB, "L40S": 46068 * MiB,
    "A100-40G": 40960 * MiB, "A100-80G": 81920 * MiB, "H100": 81559 * MiB, "H200": 143771 * MiB,
}

# AWS instance types: (vCPUs, host memory GiB, GPUs, Ray's accelerator type). The shipped files use
# m5.4xlarge (head), g5.2xlarge and p5.48xlarge; the rest are their usual neighbours.
INSTANCE_TYPES: dict[str, tuple[int, int, int, str | None]] = {
    "m5.4xlarge": (16, 64, 0, None), "m5.8xlarge": (32, 128, 0, None),
    "g5.xlarge": (4, 16, 1, "A10G"), "g5.2xlarge": (8, 32, 1, "A10G"), "g5.4xlarge": (16, 64, 1, "A10G"),
    "g5.12xlarge": (48, 192, 4, "A10G"), "g5.48xlarge": (192, 768, 8, "A10G"),
    "g6.2xlarge": (8, 32, 1, "L4"), "g6e.2xlarge": (8, 64, 1, "L40S"),
    "p4d.24xlarge": (96, 1152, 8, "A100-40G"), "p4de.24xlarge": (96, 1152, 8, "A100-80G"),
    "p5.48xlarge": (192, 2048, 8, "H100"),
}


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class NodeType:
    """One kind of node: what Ray sees on it (None: not known) and how many there can be."""

    name: str
    cpus: float | None = None
    gpus: int = 0
    gpu_type: str | None = None  # Ray's accelerator type
    gpu_memory: int | None = None  # bytes per GPU
    host_memory: int | None = None  # bytes per node
    max_nodes: int | None = None  # None: no bound known

    def describe(self) -> str:
        cpus = "? CPUs" if self.cpus is None else f"{self.cpus:g} CPUs"
        gpu = f"{self.gpus} x {self.gpu_type or 'GPU'}" + (f" {gib(self.gpu_memory)}" if self.gpu_memory else "")
        count = "any number" if self.max_nodes is None else f"up to {self.max_nodes}"
        return f"{self.name} ({cpus}, {gpu if self.gpus else 'no GPU'}; {count})"


@dataclass(frozen=True)
class Cluster:
    source: str
    node_types: tuple[NodeType, ...]
    max_workers: int | None = None  # the launcher's bound on worker nodes of all types together


@dataclass(frozen=True)
class Bundle:
    """What one worker or replica asks of Ray."""

    cpus: float
    gpus: int = 0
    accelerator_type: str | None = None

    def describe(self) -> str:
        extra = f", {self.accelerator_type}" if self.accelerator_type else ""
        return f"{{CPU: {self.cpus:g}, GPU: {self.gpus}{extra}}}"

    def per_node(self, node: NodeType) -> int | None:
        """How many of these one node of `node` holds (None: unbounded, nothing known limits it)."""
        if self.gpus and (node.gpus < self.gpus or (self.accelerator_type and node.gpu_type != self.accelerator_type)):
            return 0
        fits = [node.gpus // self.gpus] if self.gpus else []
        if node.cpus is not None and self.cpus:
            fits.append(int(node.cpus // self.cpus))
        return min(fits) if fits else None


def capacity(bundle: Bundle, cluster: Cluster) -> int | None:
    """The most `bundle`s `cluster` holds at once (0: not one; None: no bound known)."""
    hosts = [(n, k) for n in cluster.node_types if (k := bundle.per_node(n)) is None or k > 0]
    if any(k is None or n.max_nodes is None for n, k in hosts):
        return None
    most = sum(k * n.max_nodes for n, k in hosts)
    if cluster.max_workers is not None:  # the best the cap allows: the roomiest nodes first
        per = sorted((k for n, k in hosts for _ in range(n.max_nodes)), reverse=True)
        most = min(most, sum(per[: cluster.max_workers + 1]))  # + the head, which max_workers does not count
    return most


def placement_problems(bundle: Bundle, count: int, cluster: Cluster) -> list[str]:
    """Why `count` bundles cannot all be placed on `cluster` at once (empty: they can)."""
    most = capacity(bundle, cluster)
    if most == 0:
        kinds = "; ".join(n.describe() for n in cluster.node_types) or "no node types"
        return [f"no node of {cluster.source} can hold one {bundle.describe()}: it has {kinds}"]
    if most is None or most >= count:
        return []
    return [f"{count} x {bundle.describe()} asked, {cluster.source} holds at most {most} at once "
            f"({'; '.join(n.describe() for n in cluster.node_types)})"]


# --- sizes -------------------------------------------------------------------------------------------

_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": MiB, "gi": GiB, "ti": 2**40}


def parse_size(text: str | int | float, bare: int = GiB) -> int:
    """Bytes of '80GiB', '80G', '24Gi', '40GB', '512Mi' (Kubernetes quantities too); a bare number is in
    units of `bare` (GiB on the command line; bytes in a Kubernetes manifest)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", str(text), flags=re.I)
    if not m:
        raise ValueError(f"not a size: {text!r}; e.g. 80GiB, 24GB, 512Mi")
    return int(float(m.group(1)) * (_UNITS[m.group(2).lower()] if m.group(2) else bare))


def _cpus(text: Any) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gpu_of(instance: str | None, product: str | None = None) -> tuple[str | None, int | None]:
    """(accelerator type, memory per GPU) of an instance type, or of an NVIDIA GPU product label
    ('NVIDIA-A10G', 'NVIDIA-H100-80GB-HBM3', 'NVIDIA-A100-SXM4-80GB')."""
    gpu = INSTANCE_TYPES.get(instance or "", (0, 0, 0, None))[3]
    if gpu is None and product:
        p = product.upper()
        if "A100" in p:
            gpu = "A100-80G" if "80GB" in p else "A100-40G"
        else:  # the longest name first: 'L40S' before 'L4'
            gpu = next((g for g in sorted(GPU_MEMORY, key=len, reverse=True) if g in p), None)
    return gpu, GPU_MEMORY.get(gpu) if gpu else None


# --- cluster files --------------------------------------------------------------------------------------


def read_cluster(path: str | Path) -> Cluster:
    """The node types of a Ray cluster launcher YAML or a KubeRay RayCluster / RayJob / RayService."""
    raw = read_yaml(path, "cluster file")
    if "available_node_types" in raw:
        return _launcher(raw, str(path))
    spec = raw.get("spec") or {}
    spec = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        raw.get("kind"))
    if not isinstance(spec, dict):
        raise ConfigError(str(path), ["not a cluster file: give a Ray cluster launcher YAML (available_node_types, "
                                      "e.g. cluster.yaml) or a KubeRay RayCluster/RayJob/RayService manifest"])
    return _kuberay(spec, str(path))


def _launcher(raw: dict[str, Any], source: str) -> Cluster:
    types = []
    for name, node in (raw.get("available_node_types") or {}).items():
        instance = (node.get("node_config") or {}).get("InstanceType")
        vcpus, ram, gpus, _ = INSTANCE_TYPES.get(instance, (None, None, 0, None))
        res = node.get("resources") or {}
        gpu_type, memory = _gpu_of(instance)
        head = name == raw.get("head_node_type")
        types.append(NodeType(
            name=f"{name} ({instance})", cpus=res.get("CPU", vcpus), gpus=int(res.get("GPU", gpus)), gpu_type=gpu_type,
            gpu_memory=memory, host_memory=ram * GiB if ram else None,
            max_nodes=1 if head else node.get("max_workers", raw.get("max_workers"))))
    return Cluster(source, tuple(types), raw.get("max_workers"))


def _kuberay(spec: dict[str, Any], source: str) -> Cluster:
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    groups = [("head", spec.get("headGroupSpec") or {}, 1)]
    for g in spec.get("workerGroupSpecs") or []:
        groups.append((g.get("groupName", "workers"), g, g.get("maxReplicas") if autoscaling else g.get("replicas", 1)))
    types = []
    for name, group, count in groups:
        pod = (group.get("template") or {}).get("spec") or {}
        container = (pod.get("containers") or [{}])[0]
        resources = container.get("resources") or {}
        limits = {**resources.get("requests", {}), **resources.get("limits", {})}
        params = group.get("rayStartParams") or {}
        labels = pod.get("nodeSelector") or {}
        gpu_type, memory = _gpu_of(labels.get("node.kubernetes.io/instance-type"), labels.get("nvidia.com/gpu.product"))
        cpus = params.get("num-cpus", limits.get("cpu"))
        types.append(NodeType(
            name=f"{name} group", cpus=_cpus(cpus) if cpus is not None else None,
            gpus=int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))), gpu_type=gpu_type, gpu_memory=memory,
            host_memory=parse_size(limits["memory"], bare=1) if "memory" in limits else None, max_nodes=count))
    return Cluster(source, tuple(types))


def flag_cluster(gpus: int | None, gpu_memory: str | None) -> Cluster:
    """``--gpus N --gpu-memory SIZE``: N GPUs of that size (one per node as far as placement goes)."""
    memory = parse_size(gpu_memory) if gpu_memory else None
    node = NodeType(name=f"GPU{' ' + gib(memory) if memory else ''}", gpus=1, gpu_memory=memory, max_nodes=gpus)
    return Cluster(f"--gpus {gpus or '?'}" + (f" --gpu-memory {gpu_memory}" if gpu_memory else ""), (node,))


def running_cluster() -> Cluster | None:
    """The Ray cluster this process is connected to, when what it can hold is known: a private local
    instance (its nodes are all there is), or a cluster whose autoscaler publishes its node groups (their
    most nodes). None when Ray is not up, or a joined cluster's autoscaling is not known: then nothing
    is refused, since more nodes may come."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.state import state  # the autoscaler's published config; Ray-internal

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray: the groups are unknown
        config = None
    if config is None and os.environ.get("RAY_ADDRESS"):
        return None
    counts: dict[tuple, int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            key = tuple(sorted(node.get("Resources", {}).items()))
            counts[key] = counts.get(key, 0) + 1
    types = [_from_resources(f"node {i + 1}", dict(k), n) for i, (k, n) in enumerate(counts.items())]
    for g in getattr(config, "node_group_configs", []) or []:
        types.append(_from_resources(f"group {g.name}", dict(g.resources), None if g.max_count < 0 else g.max_count))
    return Cluster("the running Ray cluster", tuple(types))


def _from_resources(name: str, res: dict[str, float], count: int | None) -> NodeType:
    gpu_type = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
    memory = res.get("memory")
    return NodeType(name=name, cpus=float(res.get("CPU", 0)), gpus=int(res.get("GPU", 0)), gpu_type=gpu_type,
                    gpu_memory=GPU_MEMORY.get(gpu_type or ""), host_memory=int(memory) if memory else None,
                    max_nodes=count)


def with_gpu_memory(cluster: Cluster, memory: int) -> Cluster:
    """`cluster` with every GPU node's memory set (``--gpu-memory`` with ``--cluster``)."""
    types = tuple(replace(n, gpu_memory=memory) if n.gpus else n for n in cluster.node_types)
    return replace(cluster, node_types=types, source=f"{cluster.source} (GPUs of {gib(memory)})")


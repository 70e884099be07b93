"""Flags that several `lorafleet` subcommands share, spelled once."""

from __future__ import annotations

import argparse

__all__ = ["add_cluster", "add_output", "add_overrides", "cluster_from_args", "shutdown_ray"]


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--set KEY=VALUE` (repeatable): a dotted override of the command's YAML config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_output(parser: argparse.ArgumentParser, json_help: str, quiet_help: str | None = None) -> None:
    """`--json` (a machine-readable result on stdout) and, with ``quiet_help``, `--quiet` (no live progress)."""
    parser.add_argument("--json", action="store_true", help=json_help)
    if quiet_help:
        parser.add_argument("--quiet", action="store_true", help=quiet_help)


def add_cluster(parser: argparse.ArgumentParser, what: str = "refuse at once what cannot be placed or fit there") -> None:
    """`--cluster FILE`, `--gpus N`, `--gpu-memory SIZE`: the cluster the memory planner checks against."""
    parser.add_argument("--cluster", metavar="FILE", help=f"a Ray cluster launcher YAML (cluster.yaml) or a KubeRay "
                        f"manifest (configs/k8s/raycluster.yaml): {what}")
    parser.add_argument("--gpus", type=int, metavar="N", help=f"instead of --cluster: N GPUs; {what}")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU (80GiB, 24GB); with --cluster: "
                        "overrides what its files say")


def cluster_from_args(args: argparse.Namespace):
    """The `lorafleet.train.clusters.Cluster` that --cluster / --gpus / --gpu-memory name, or None."""
    from lorafleet.config import ConfigError
    from lorafleet.train.clusters import flag_cluster, parse_size, read_cluster, with_gpu_memory

    if args.cluster and args.gpus:
        raise ConfigError("--cluster", ["give --cluster FILE or --gpus N, not both"])
    try:
        memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ValueError as err:
        raise ConfigError("--gpu-memory", [str(err)]) from None
    if args.cluster:
        cluster = read_cluster(args.cluster)
        return with_gpu_memory(cluster, memory) if memory else cluster
    return flag_cluster(args.gpus, args.gpu_memory) if args.gpus or memory else None


def shutdown_ray() -> None:
    """Stop the command's Ray now: its forwarded worker and raylet logs flush here, so nothing
    prints after the summary (a `--json` line must be the last line)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

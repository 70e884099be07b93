"""How Ray starts: join the cluster a job was submitted to, or start a private local instance.

The one home for Ray's start-up settings (and a free local port), shared by the CLI, the jobs, the
demo, the benchmarks and the tests.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, TypeVar

import ray

__all__ = ["LOCAL_TRAIN_POLL_S", "TRAIN_POLL_ENV", "NoAcceleratorError", "free_port", "init_ray", "on_run_accelerator",
           "start_local_ray"]

logger = logging.getLogger(__name__)


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.2"  # seconds; see init_ray
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a private local instance.

    A bare `ray.init()` would silently attach to any Ray already running on this machine. Locally
    the dashboard gets a known port and every Ray process gets `RAY_API_SERVER_ADDRESS` pointing at
    it: Ray Train's PlacementGroupCleaner finds the cluster through the state API, and with several
    Ray instances on one machine its auto-detection fails ("Found multiple active Ray instances"),
    so a finished (or ASHA-stopped) run's CPUs never come back. Tune with the dashboard off
    deadlocked (docs/SWEEPS.md).

    Locally Ray Train's controller also polls its workers every 0.2 s instead of every 2 s
    (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, unless set): worker-group start, each `report()` and the end
    of a run wait for a poll, and a 60-step run spent ~4 s of its ~21 s in those waits (the 7-rung
    classification ladder, 121 s -> 104 s, same metrics, 2 CPU cores). A cluster keeps Ray's 2 s.

    Locally Ray Train's preemption watcher is off too (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, unless
    set): it is one more actor process per run (~1.5 s of CPU to start, measured 2026-12-07) that
    waits for the node to be drained, and a private local instance's only node never is.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        port = free_port()
        start_local_ray(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_port=port,
            runtime_env={"env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S),
                PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0"),
            }},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def start_local_ray(**init_args: Any) -> None:
    """``ray.init(address="local", **init_args)``, tried once more if Ray's own start-up gave up.

    Ray waits a fixed 30 s for a new node's raylet to register with its GCS (``ray/_private/node.py``,
    not configurable) and then raises "The current node timed out during startup". On a 2-core machine
    busy training or serving, a start has missed that by seconds (the test suite, 2026-12-07). The
    processes of the failed try are stopped before the second.
    """
    import psutil

    for attempt in (1, 2):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **init_args)
            return
        except Exception as err:  # Ray raises a bare Exception for it
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            logger.warning("Ray's local start timed out (%s); stopping what it started and trying once more", err)
            ray.shutdown()
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in before:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(2)


def free_port() -> int:
    """A loopback TCP port the kernel says is free now (it may be taken again before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


T = TypeVar("T")


class NoAcceleratorError(RuntimeError):
    """A GPU run's model was to be scored, and the Ray cluster has no GPU to score it on."""


def on_run_accelerator(fn: Callable[..., T], *, use_gpu: bool, cpus: float = 1) -> Callable[..., T]:
    """`fn`, to be called where a run's model lives: in a Ray task holding one GPU when the run trained on
    GPUs (`scaling.use_gpu`; the driver of a cluster job is often a CPU-only head), else right here.

    A GPU run on a cluster without GPUs is an error that says so, never a silent hour of scoring on a CPU
    (nor a task that waits forever for a GPU that never comes)."""
    if not use_gpu:
        return fn

    def remote(*args: Any, **kwargs: Any) -> T:
        init_ray()
        if ray.cluster_resources().get("GPU", 0) < 1:
            raise NoAcceleratorError(
                f"{getattr(fn, '__name__', 'scoring')}: the run trained on GPUs (scaling.use_gpu: true) and this Ray "
                "cluster has none; run it on the GPU cluster (RAY_ADDRESS), or score on CPU with "
                "--set scaling.use_gpu=false")
        return ray.get(ray.remote(num_gpus=1, num_cpus=cpus)(fn).remote(*args, **kwargs))

    return remote

"""How Ray starts: join the cluster a job was submitted to, or start a private local instance.

The one home for Ray's start-up settings (and a free local port), shared by the CLI, the jobs, the
demo, the benchmarks and the tests.
"""

from __future__ import annotations

import logging
import os
import random
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
        def dashboard() -> dict[str, Any]:  # a new port for each try: see start_local_ray
            port = free_port()
            return {"dashboard_port": port, "runtime_env": {"env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S),
                PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0"),
            }}}

        start_local_ray(dashboard, num_cpus=num_cpus, include_dashboard=True)
    ray.data.DataContext.get_current().enable_progress_bars = False


# The start-up failures a second try gets past: Ray's fixed 30-s wait for the raylet, and a port that was
# free when picked and taken before Ray bound it.
_RETRIED = ("timed out during startup", "address already in use")


def start_local_ray(ports: Callable[[], dict[str, Any]] | None = None, **init_args: Any) -> None:
    """``ray.init(address="local", **init_args)``, tried once more if Ray's own start-up gave up.

    Ray waits a fixed 30 s for a new node's raylet to register with its GCS (``ray/_private/node.py``,
    not configurable) and then raises "The current node timed out during startup". On a 2-core machine
    busy training or serving, a start has missed that by seconds (the test suite, 2026-12-07). And a
    port picked free can be taken before Ray binds it: the dashboard then fails with "address already
    in use" (seen once in the suite, 2026-12-07). The processes of the failed try are stopped before the
    second; ``ports``, when given, is called before each try for the arguments that name ports, so the
    second try asks for new ones.
    """
    import psutil

    for attempt in (1, 2):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **init_args, **(ports() if ports else {}))
            return
        except Exception as err:  # Ray raises a bare Exception for both
            if attempt == 2 or not any(text in str(err) for text in _RETRIED):
                raise
            logger.warning("Ray's local start failed (%s); stopping what it started and trying once more", err)
            ray.shutdown()
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in before:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(2)


_handed_out: set[int] = set()


def free_port(low: int = 20000, high: int = 29999) -> int:
    """A loopback TCP port that is free now, clear of where other sockets land meanwhile: Ray's worker
    ports (10002-19999), Serve's direct-ingress ports (30000+) and the kernel's ephemeral range (32768+),
    where Ray's own listening sockets and every outgoing connection get theirs (a port the kernel hands
    out as free is one an outgoing connection can take before the server binds it). Never the same one
    twice in a process."""
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


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

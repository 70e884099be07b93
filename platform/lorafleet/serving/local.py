"""Starting a local Ray Serve app the way `lorafleet serve` does: the environment every Ray process of
that local Ray reads at start (HAProxy in front, loopback), and HAProxy's private folder. Shared by the
CLI, the demo, the benchmarks and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LOCAL_SERVE_ENV", "SERVE_FAST_PATH_ENV", "private_haproxy", "use_serve_fast_path"]


# Ray Serve's throughput-optimized mode with HAProxy in front: HTTP goes from HAProxy (C) straight
# to the ingress replica's own HTTP server instead of through Ray's Python proxy actor and an
# actor call; user code runs on the replica's main event loop; deployment handles use gRPC.
# Measured on a 2-core CPU machine (bench/SERVE_RESULTS.md): the serving path's CPU per request
# fell from 31-33 ms to 9-17 ms. Values already in the environment win (the first two "0": Ray's
# default path).
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # The optimized mode also stops replica logs going to stderr; keep them on the console (access
    # logs are off in serve/config.yaml, so this is not per request).
    "RAY_SERVE_LOG_TO_STDERR": "1",
}


# Only for the local Ray that `lorafleet serve` starts on one machine: with direct ingress, a stopping
# ingress replica stays reachable for 30 s by default so an external load balancer can deregister it,
# which made every local shutdown wait 30 s. Here the only balancer is Ray's own HAProxy on this
# machine, which retries a refused connection on another replica (Ray's replica.py,
# _drain_behind_haproxy); a cluster keeps Ray's default (cluster.yaml does not set it).
#
# And Ray's node address on loopback: Ray's own servers (GCS, raylet, workers' gRPC, agents) then
# listen on 127.0.0.1 instead of every interface, so a server on 127.0.0.1 opens nothing to the
# network (tests/test_serving.py lists the listening sockets). Ray's Linux default is the machine's
# address (its "cluster" mode); a local `lorafleet serve` is one node, and HAProxy, the only process
# a client talks to, still listens on http_options.host whatever it is.
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def private_haproxy() -> Path:
    """Ray Serve's HAProxy for the local Ray about to start: its files in a private folder of this
    process (the folder, to remove on exit), its stats page and Prometheus frontend off, Ray Serve's
    fallback proxy on a free port instead of 8500 (values already set win), and Ray's haproxy.cfg
    template rewritten (listeners on the HTTP host, admin socket 0600; see lorafleet.serving._ray_serve). Call it before that Ray starts and before
    ``ray.serve`` is imported here; the template is rewritten here too, so a Ray release whose
    template differs stops `lorafleet serve` at once."""
    from lorafleet.cluster import free_port
    from lorafleet.serving._ray_serve import patch_haproxy_template
    from lorafleet.serving.haproxy import haproxy_env, private_folder

    folder = private_folder()
    for key, value in haproxy_env(folder).items():
        os.environ.setdefault(key, value)
    # Ray Serve's fallback proxy, which HAProxy mode starts on the head node, binds 8500 unless told
    # otherwise: a second local server on the machine would stop there. A free port of its own instead.
    os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(free_port()))
    patch_haproxy_template()
    return folder


def use_serve_fast_path() -> None:
    """Put SERVE_FAST_PATH_ENV and LOCAL_SERVE_ENV into this process's environment (values already
    set win).

    Every Ray process reads these when it starts: call this before the local Ray that will serve is
    started (``ray.init``) and before ``ray.serve`` is imported here.
    """
    for key, value in {**SERVE_FAST_PATH_ENV, **LOCAL_SERVE_ENV}.items():
        os.environ.setdefault(key, value)
    from lorafleet.serving._ray_serve import reread_cluster_flag

    reread_cluster_flag()  # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported, maybe before this

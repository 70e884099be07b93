"""`lorafleet.cluster.start_local_ray`: Ray's fixed 30-s wait for a new node's raylet can run out on a busy
2-core machine, and a port picked free can be taken before Ray binds it; the start is tried once more (on
new ports), and only for those errors (Ray itself is faked here: the failures it stands for cannot be
produced on demand). `free_port` keeps out of the kernel's ephemeral range."""

from __future__ import annotations

import pytest

from lorafleet import cluster


def _fake_ray(monkeypatch, errors: list[Exception]) -> list[str]:
    calls: list[str] = []

    def init(**kwargs):
        port = f" :{kwargs['dashboard_port']}" if "dashboard_port" in kwargs else ""
        calls.append(f"init {kwargs['address']} {kwargs.get('num_cpus')}{port}")
        if errors:
            raise errors.pop(0)

    monkeypatch.setattr(cluster.ray, "init", init)
    monkeypatch.setattr(cluster.ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    return calls


TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


def test_a_start_that_timed_out_is_tried_once_more(monkeypatch):
    calls = _fake_ray(monkeypatch, [TIMEOUT])
    cluster.start_local_ray(num_cpus=2)
    assert calls == ["init local 2", "shutdown", "init local 2"]


def test_twice_timed_out_or_another_error_is_raised(monkeypatch):
    calls = _fake_ray(monkeypatch, [TIMEOUT, TIMEOUT])
    with pytest.raises(Exception, match="timed out during startup"):
        cluster.start_local_ray(num_cpus=2)
    assert calls == ["init local 2", "shutdown", "init local 2"]
    calls = _fake_ray(monkeypatch, [ValueError("bad argument")])
    with pytest.raises(ValueError):
        cluster.start_local_ray(num_cpus=2)
    assert calls == ["init local 2"]


PORT_TAKEN = Exception("Failed to find a valid port for dashboard after 0 retries: [Errno 98] error while "
                       "attempting to bind on address ('127.0.0.1', 44227): address already in use")


def test_a_port_taken_meanwhile_is_tried_once_more_on_a_new_port(monkeypatch):
    calls = _fake_ray(monkeypatch, [PORT_TAKEN])
    ports = iter([21001, 21002])
    cluster.start_local_ray(lambda: {"dashboard_port": next(ports)}, num_cpus=2)
    assert calls == ["init local 2 :21001", "shutdown", "init local 2 :21002"]


def test_free_port_is_outside_the_ephemeral_range_and_never_repeats():
    ports = [cluster.free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(20000 <= p <= 29999 for p in ports)

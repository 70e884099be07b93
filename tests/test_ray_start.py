"""`lorafleet.cluster.start_local_ray`: Ray's fixed 30-s wait for a new node's raylet can run out on a busy
2-core machine; the start is tried once more, and only for that error (Ray itself is faked here: the
failure it stands for cannot be produced on demand)."""

from __future__ import annotations

import pytest

from lorafleet import cluster


def _fake_ray(monkeypatch, errors: list[Exception]) -> list[str]:
    calls: list[str] = []

    def init(**kwargs):
        calls.append(f"init {kwargs['address']} {kwargs.get('num_cpus')}")
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

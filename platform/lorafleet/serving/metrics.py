"""Prometheus metrics of the ingress: request count and latency per endpoint, adapter and status.

Served as text on ``GET /metrics`` of each ingress replica, followed there by vLLM's own engine
metrics (``vllm:*``: queue lengths, tokens, latencies) when the engine runs in the same replica
(``ingress: colocated``). Ray Serve's metrics, and vLLM's engine metrics with ``ingress: separate``,
are exported on Ray's metrics port as usual.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["RequestMetrics", "CONTENT_TYPE_LATEST"]


class RequestMetrics:
    """One registry per ingress replica (not the process-global one, so tests can make several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_requests", "Requests by endpoint, adapter ('name@version' or 'base') and status.",
            ["endpoint", "adapter", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "lorafleet_request_latency_seconds", "Request latency by endpoint and adapter.",
            ["endpoint", "adapter"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.in_flight = Gauge(
            "lorafleet_requests_in_flight", "Requests under /v1/ admitted and not yet answered on this replica "
            "(the request guard's count, against limits.max_in_flight).", registry=self.registry,
        )

    def observe(self, endpoint: str, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, adapter, str(status)).inc()
        self.latency.labels(endpoint, adapter).observe(seconds)

    @contextmanager
    def timed(self, endpoint: str) -> Iterator[dict]:
        """Time a request; the body sets ``info['adapter']`` and ``info['status']`` as it learns them."""
        info = {"adapter": "-", "status": 200}
        start = time.perf_counter()
        try:
            yield info
        except Exception as exc:
            info["status"] = getattr(exc, "status", None) or getattr(exc, "status_code", None) or 500
            raise
        finally:
            self.observe(endpoint, info["adapter"], int(info["status"]), time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)

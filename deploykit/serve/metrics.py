"""Prometheus metrics of one app, in a registry of its own (two apps in one process count apart)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
#: Request methods counted by name; any other token a client sends is counted as "other", so that clients
#: cannot create series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The server's series. Names are prefixed ``deploykit_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        reg = self.registry
        self.requests = Counter(
            "deploykit_requests",
            "HTTP requests by model, route and status.",
            ["model", "route", "method", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "deploykit_request_duration_seconds",
            "Request latency (whole request).",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "deploykit_queue_duration_seconds",
            "Time requests waited in the batch queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_time = Histogram(
            "deploykit_inference_duration_seconds",
            "ONNX Runtime time per batch call.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.calls = Counter(
            "deploykit_inference_calls",
            "ONNX Runtime calls by session: 'solo' (a call alone, on every core) or 'shared' (side by side).",
            ["model", "session"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "deploykit_batch_size",
            "Rows per ONNX Runtime call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            "deploykit_requests_in_flight",
            "Requests being handled.",
            registry=reg,
        )
        self.model_ready = Gauge(
            "deploykit_model_ready",
            "1 when the model is loaded and passed its self-test.",
            ["model"],
            registry=reg,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set (``labels`` validates and locks on every
        call; a request observes five series)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(
        self, model: str, route: str, method: str, status: int, seconds: float | None
    ) -> None:
        """Count a finished request and, when its start is known, its latency."""
        method = method if method in METHODS else "other"
        self._child(self.requests, model, route, method, str(status)).inc()
        if seconds is not None:
            self._child(self.latency, model, route).observe(seconds)

    def observe_queue(self, model: str, seconds: float) -> None:
        self._child(self.queue_time, model).observe(seconds)

    def observe_batch(self, model: str, rows: int, seconds: float, solo: bool) -> None:
        self._child(self.calls, model, "solo" if solo else "shared").inc()
        self._child(self.batch_size, model).observe(rows)
        self._child(self.inference_time, model).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)

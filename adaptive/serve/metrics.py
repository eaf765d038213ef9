"""``GET /metrics``: the cache's counters and residency, and the server's latencies and SLO
attainment, through ``prometheus_client`` (one registry per app, so apps do not collide).

The cache's figures are read from :meth:`VariantCache.stats` at scrape time (a custom
collector: one consistent snapshot per scrape); latencies are histograms the server fills.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

#: seconds; from a hit on a small CPU model to a cold load of a large one
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class _CacheCollector(Collector):
    def __init__(self, cache: Any, slo: _SloTracker):
        self.cache = cache
        self.slo = slo

    def collect(self) -> Iterator[Any]:
        st = self.cache.stats()

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"memadapt_{name}", help_, value=value)

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"memadapt_{name}", help_, value=value)

        yield counter("requests", "Inference requests the cache received.", st.requests)
        yield counter("hits", "Requests served at once by a resident variant.", st.hits)
        yield counter("misses", "Requests that stalled: they waited for a load first.",
                      st.misses)
        yield counter("failures", "Requests that raised (infeasible budget, bad input).",
                      st.failures)
        yield counter("cold_loads", "Loads that requests triggered.", st.cold_loads)
        yield counter("prefetches", "Loads that re-plans made for models not resident.",
                      st.prefetches)
        swaps = CounterMetricFamily("memadapt_swaps", "Variant swaps.", labels=["kind"])
        swaps.add_metric(["downgrade"], st.downgrades)
        swaps.add_metric(["upgrade"], st.upgrades)
        yield swaps
        yield counter("evictions", "Models evicted.", st.evictions)
        yield counter("rebalances", "Re-plans applied.", st.rebalances)
        yield gauge("resident_bytes", "Bytes charged to the budget (loads and draining "
                    "sessions included).", st.bytes_resident)
        yield gauge("budget_bytes", "The memory budget in force.", st.budget_bytes)
        yield gauge("shared_bytes", "Of the resident bytes: tensors several models share, "
                    "held and charged once.", st.shared_bytes)
        yield gauge("host_bytes", "The host tier (ONNX bytes kept for fast re-loads).",
                    st.host_bytes)
        per = {
            "model_requests": CounterMetricFamily("memadapt_model_requests",
                                                  "Requests per model.", labels=["model"]),
            "model_hits": CounterMetricFamily("memadapt_model_hits", "Hits per model.",
                                              labels=["model"]),
            "model_resident_bytes": GaugeMetricFamily(
                "memadapt_model_resident_bytes", "Bytes a model's resident variant is charged "
                "(beyond shared tensors).", labels=["model", "variant"]),
            "served_accuracy": GaugeMetricFamily(
                "memadapt_served_accuracy", "Mean accuracy of the variants that served a model.",
                labels=["model"]),
            "floor": GaugeMetricFamily("memadapt_accuracy_floor", "A model's accuracy floor.",
                                       labels=["model"]),
        }
        for m in st.models.values():
            per["model_requests"].add_metric([m.model], m.requests)
            per["model_hits"].add_metric([m.model], m.hits)
            per["floor"].add_metric([m.model], m.floor)
            if m.variant:
                per["model_resident_bytes"].add_metric([m.model, m.variant], m.memory_bytes)
            if m.served_accuracy is not None:
                per["served_accuracy"].add_metric([m.model], m.served_accuracy)
        yield from per.values()
        att = GaugeMetricFamily("memadapt_slo_attainment", "Share of a model's requests "
                                "answered within its latency SLO (--slo); a failed request "
                                "misses it.", labels=["model"])
        for model, share in self.slo.attainment().items():
            att.add_metric([model], share)
        yield att


class _SloTracker:
    def __init__(self, slos: Mapping[str, float]):
        self.slos = dict(slos)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {m: [0, 0] for m in self.slos}

    def observe(self, model: str, seconds: float) -> None:
        slo = self.slos.get(model)
        if slo is None:
            return
        with self._lock:
            c = self._counts[model]
            c[0] += seconds <= slo
            c[1] += 1

    def attainment(self) -> dict[str, float]:
        with self._lock:
            return {m: met / n for m, (met, n) in self._counts.items() if n}


class ServerMetrics:
    """Everything ``/metrics`` shows for one app: ``slos`` maps models to seconds."""

    def __init__(self, cache: Any, slos: Mapping[str, float] | None = None):
        self.registry = CollectorRegistry()
        self._slo = _SloTracker(slos or {})
        self.registry.register(_CacheCollector(cache, self._slo))
        self.latency = Histogram(
            "memadapt_request_latency_seconds", "Inference latency in the cache (waiting for a "
            "load included), per model and the variant that served.", ["model", "variant"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stall = Histogram(
            "memadapt_stall_seconds", "Latency of the requests that waited for a load.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("memadapt_http_errors", "HTTP error responses by status.",
                              ["status"], registry=self.registry)

    def served(self, model: str, variant: str, seconds: float, cold: bool) -> None:
        self.latency.labels(model, variant).observe(seconds)
        if cold:
            self.stall.labels(model).observe(seconds)
        self._slo.observe(model, seconds)

    def failed(self, model: str) -> None:
        """A request for ``model`` got no answer (it misses its SLO)."""
        self._slo.observe(model, float("inf"))

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

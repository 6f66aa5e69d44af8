"""The proxy's Prometheus metrics, in a registry of its own (so several apps in one process keep theirs apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline.defend.batching import BatchStats, ModelWorker
from pipeline.models.prefix_cache import prefix_cache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


PREFIX_CACHE_GAUGES = {
    "entries": "Shared prompt starts whose keys and values the model keeps (0 with --prefix-cache-tokens 0)",
    "tokens": "Tokens those entries hold, bounded by --prefix-cache-tokens",
    "bytes": "Bytes of keys and values those entries hold",
    "hits": "Forwards that started from a kept prompt start, since the proxy started",
    "misses": "Forwards no kept prompt start covered, since the proxy started",
    "shared_in_batch": "Prompt tokens a micro-batch ran once for several rows (a long request's views), since start",
}


def _prefix_cache_figure(adapter: object, name: str) -> float:
    cache = prefix_cache(adapter)
    return 0.0 if cache is None else float(getattr(cache.stats(), name))


class ServeMetrics:
    """Requests by outcome, refusals, check errors, latency / batch-size histograms, and the model queue's gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queued = Gauge(
            "lsi_guard_queued",
            "Checks and local-mode answers waiting for the model thread",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lsi_guard_in_flight",
            "Checks (the running micro-batch's size) or local-mode answers (one) on the model thread now",
            registry=self.registry,
        )
        self.requests = Counter(
            "lsi_guard_requests",
            "Chat completion requests by outcome "
            "(answered, refused, bad_request, limit, upstream_error, error, unauthorized)",
            ["outcome"],
            registry=self.registry,
        )
        self.refusals = Counter("lsi_guard_refusals", "Requests the guard refused", registry=self.registry)
        self.check_errors = Counter(
            "lsi_guard_check_errors", "Checks that failed, decided by guard.on_error", registry=self.registry
        )
        self.latency = Histogram(
            "lsi_guard_request_seconds",
            "Seconds from a request's arrival to its response (to the first byte when streaming)",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.check_latency = Histogram(
            "lsi_guard_check_seconds",
            "Seconds of the check: upstream mode, from arrival to the decision (queueing and batching included); "
            "local mode, the guard's prefix and check",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "lsi_guard_batch_size", "Requests per micro-batch of checks", registry=self.registry, buckets=BATCH_BUCKETS
        )
        self.batch_seconds = Histogram(
            "lsi_guard_batch_seconds",
            "Seconds of one micro-batch's check",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )

    def watch(self, worker: ModelWorker) -> None:
        """Read the gauges from ``worker`` and its model's shared-prefix cache at every scrape."""
        self.queued.set_function(lambda: worker.queued)
        self.in_flight.set_function(lambda: worker.in_flight)
        adapter = worker.guard.adapter
        for name, what in PREFIX_CACHE_GAUGES.items():
            gauge = Gauge(f"lsi_guard_prefix_cache_{name}", what, registry=self.registry)
            gauge.set_function(lambda name=name: _prefix_cache_figure(adapter, name))

    def record_batch(self, stats: BatchStats) -> None:
        """One micro-batch scored (called on the model thread; prometheus_client is thread-safe)."""
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.seconds)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)

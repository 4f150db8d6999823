"""Prometheus metrics, all prefixed ``notifier_``, in a registry of their own
so several apps (tests) can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("notifier_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge("notifier_subscriptions", "Active subscriptions", registry=r)
        self.topics = Gauge("notifier_topics", "Topics with at least one subscriber", registry=r)
        self.published = Counter(
            "notifier_messages_published", "Messages published", ["path", "kind"], registry=r)
        self.delivered = Counter(
            "notifier_messages_delivered", "Message frames queued to subscribers", registry=r)
        self.delivery_latency = Histogram(
            "notifier_publish_to_delivery_seconds",
            "From a publish arriving to its hand-off for fan-out (durable: after the commit)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.slow_consumers = Counter(
            "notifier_slow_consumer_disconnects", "Connections closed with 4009", registry=r)
        self.commit_latency = Histogram(
            "notifier_store_commit_seconds", "Duration of one store group commit",
            buckets=LATENCY_BUCKETS, registry=r)
        self.commit_size = Histogram(
            "notifier_store_commit_jobs", "Jobs committed in one store group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.errors = Counter(
            "notifier_errors", "Errors answered, by code", ["code"], registry=r)

        # Children looked up once: labels() takes a lock and a dict lookup per call.
        self.published_http = self.published.labels("http", "stored")
        self.published_ws_stored = self.published.labels("ws", "stored")
        self.published_ws_ephemeral = self.published.labels("ws", "ephemeral")

    def observe_commit(self, seconds: float, jobs: int) -> None:
        # Called from the store's writer thread; prometheus_client is thread-safe.
        self.commit_latency.observe(seconds)
        self.commit_size.observe(jobs)

    def render(self) -> bytes:
        return generate_latest(self.registry)

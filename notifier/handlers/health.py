"""Liveness, readiness and metrics: no API key, so probes and scrapers can reach them."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST

from notifier.handlers.api import JsonHandler

READY_TIMEOUT = 2.0


class HealthHandler(JsonHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(JsonHandler):
    async def get(self) -> None:
        services = self.services
        if services.draining:
            self.write_json({"status": "draining"}, 503)
            return
        try:
            await asyncio.wait_for(services.store.ping(), READY_TIMEOUT)
            await asyncio.wait_for(services.broker.ping(), READY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            self.write_json({"status": "unavailable", "reason": str(exc) or type(exc).__name__}, 503)
            return
        self.write_json({"status": "ready"})


class MetricsHandler(JsonHandler):
    def get(self) -> None:
        services = self.services
        hub = services.hub
        metrics = services.metrics
        metrics.subscriptions.set(hub.subscription_count())
        metrics.topics.set(len(hub.topics))
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(metrics.render())

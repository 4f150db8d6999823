"""Wiring: the services one process shares, and every route."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tornado.web

from notifier import logs
from notifier.admission import Admission, Turnstile
from notifier.auth import ApiKeys, TokenVerifier
from notifier.broker.base import Broker
from notifier.config import Config
from notifier.handlers import api, health, openapi, static, ws
from notifier.hub import Hub
from notifier.metrics import Metrics
from notifier.node import Node
from notifier.presence import LocalPresence, Presence, RedisPresence
from notifier.outbox import Flusher
from notifier.publish import Publisher
from notifier.ratelimit import TokenBucket
from notifier.store.base import Store

TOPIC = r"([^/]+)"
# Handshakes set up per event-loop turn, at most (admission.Turnstile): each
# costs a few tenths of a millisecond, so while publishes or a fan-out are
# under way a burst lets them in every ~2 ms; with nothing else to do, more.
HANDSHAKES_PER_TURN = 4
HANDSHAKES_PER_IDLE_TURN = 64


@dataclass
class Services:
    config: Config
    store: Store
    broker: Broker
    hub: Hub
    node: Node
    presence: Presence
    publisher: Publisher
    verifier: TokenVerifier
    api_keys: ApiKeys
    metrics: Metrics
    flusher: Flusher
    admission: Admission
    turnstile: Turnstile
    log: Any = field(default_factory=logs.get)
    draining: bool = False
    publish_buckets: dict[str, TokenBucket] = field(default_factory=dict)


def build_services(config: Config, store: Store, broker: Broker) -> Services:
    metrics = Metrics()
    flusher = Flusher()
    hub = Hub(config.limits.max_buffered_bytes, flusher.schedule, metrics.delivered.inc,
              broker.watch, broker.unwatch)
    flusher.before.append(hub.flush)
    node = Node(hub, store)
    broker.listen(node)
    if hasattr(store, "commit_observer"):
        store.commit_observer = metrics.observe_commit
    publisher = Publisher(store, broker, metrics.delivery_latency.observe)
    if config.store.backend == "redis":
        # Refreshed every heartbeat: a dead node leaves presence within three.
        presence: Presence = RedisPresence(hub, config.store.redis_url, node.id,
                                           config.heartbeat.interval)
    else:
        presence = LocalPresence(hub)
    return Services(
        config=config, store=store, broker=broker, hub=hub, node=node, presence=presence,
        publisher=publisher,
        verifier=TokenVerifier(config.auth),
        api_keys=ApiKeys(config.auth.api_keys),
        metrics=metrics,
        flusher=flusher,
        admission=Admission(config.limits),
        turnstile=Turnstile(HANDSHAKES_PER_TURN, HANDSHAKES_PER_IDLE_TURN,
                            lambda: publisher.in_flight > 0 or flusher.behind),
    )


_access_log = logs.get("notifier.access")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # Tornado's default access line includes the query string, where a
    # WebSocket token may be: log the path only.
    request = handler.request
    status = handler.get_status()
    emit = _access_log.info if status < 400 else _access_log.warning if status < 500 \
        else _access_log.error
    emit("http.request", method=request.method, path=request.path, status=status,
         duration_ms=round(request.request_time() * 1000, 2), ip=request.remote_ip)


def make_app(services: Services) -> tornado.web.Application:
    args = {"services": services}
    config = services.config
    files = {"services": services, "path": str(static.STATIC_DIR)}
    demo = [
        (r"/()", static.FileHandler, {**files, "path": str(static.DEMO_DIR),
                                      "default_filename": "index.html"}),
        (r"/demo/([^/]+)", static.FileHandler, {**files, "path": str(static.DEMO_DIR)}),
    ] if config.server.demo_page else []
    return tornado.web.Application(
        [
            (r"/ws", ws.SocketHandler, args),
            (r"/api/publish", api.PublishHandler, args),
            (r"/api/publish/batch", api.BatchPublishHandler, args),
            (rf"/api/topics/{TOPIC}/messages", api.HistoryHandler, args),
            (rf"/api/topics/{TOPIC}/presence", api.PresenceHandler, args),
            (r"/api/users/([^/]+)/disconnect", api.DisconnectHandler, args),
            (r"/api/stats", api.StatsHandler, args),
            (r"/api/openapi.json", openapi.OpenApiHandler, args),
            (r"/healthz", health.HealthHandler, args),
            (r"/readyz", health.ReadyHandler, args),
            (r"/metrics", health.MetricsHandler, args),
            (r"/static/(notifier\.js|notifier\.d\.ts)", static.FileHandler,
             {**files, "shared": True}),
            *demo,
        ],
        default_handler_class=api.NotFoundHandler,
        default_handler_args=args,
        log_function=_log_request,
        # Frames above this close the socket with 1009 (SPEC: limit + 4 KiB).
        websocket_max_message_size=config.limits.max_message_bytes + 4096,
        compress_response=False,
    )

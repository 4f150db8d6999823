"""``GET /api/openapi.json``: the HTTP API's OpenAPI document. No API key: it
describes the public contract and holds nothing a key protects, and tools
(client generators, schemathesis) can read it without one."""

from __future__ import annotations

from notifier.handlers.api import JsonHandler
from notifier.openapi import DOCUMENT


class OpenApiHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(DOCUMENT)

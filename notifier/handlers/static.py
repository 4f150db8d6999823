"""The browser client and the demo page: files shipped inside the package
(``notifier/static``), served as they are. ``/static/notifier.js`` and its
``notifier.d.ts`` are always there; ``/`` and ``/demo/*`` only with
``server.demo_page``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.web

from notifier.handlers.api import finish_with_error

if TYPE_CHECKING:
    from notifier.app import Services

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DEMO_DIR = STATIC_DIR / "demo"

# Named here rather than guessed from the system's MIME table, which calls
# .ts a Qt translation file and need not know .js as JavaScript.
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}

# The demo page loads its own script and style and opens /ws on the same
# origin, nothing else. Its URL may hold a token: no Referer carries it on.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class FileHandler(tornado.web.StaticFileHandler):
    def initialize(self, path: str, services: "Services", default_filename: str | None = None,
                   shared: bool = False) -> None:
        super().initialize(path, default_filename)
        self.services = services
        self.shared = shared

    def get_content_type(self) -> str:
        return _CONTENT_TYPES.get(Path(self.absolute_path).suffix, "application/octet-stream")

    def set_extra_headers(self, path: str) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        # Revalidate every time (ETag): a new notifier version is picked up at once.
        self.set_header("Cache-Control", "no-cache")
        if self.shared:
            # A page on another origin (one of server.allowed_origins) may
            # import the module from here; it is public and sent without cookies.
            self.set_header("Access-Control-Allow-Origin", "*")
        if self.absolute_path.endswith(".html"):
            for name, value in _PAGE_HEADERS.items():
                self.set_header(name, value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        code = {404: "not_found", 405: "method_not_allowed"}.get(status_code, "bad_request")
        message = {404: "no such file", 405: f"{self.request.method} is not allowed here"}.get(
            status_code, self._reason)
        self.services.metrics.errors.labels(code).inc()
        finish_with_error(self, code, message)

"""What the client raises. Every error is a ``NotifierError``."""

from __future__ import annotations


class NotifierError(Exception):
    """Base of every error the client raises."""


class APIError(NotifierError):
    """The server answered with an error: ``status`` is the HTTP status,
    ``code`` and ``message`` come from its ``{"error": {...}}`` body."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Unauthorized(APIError):
    """401: an API key or token the server refused, or no token at all."""


class Unreachable(NotifierError):
    """The server could not be reached (refused, reset, timed out) for as
    long as the client was allowed to retry; ``__cause__`` is the last error."""


class Forbidden(NotifierError):
    """The server closed the socket with 4003 (e.g. Origin not allowed):
    reconnecting would get the same answer, so the subscription stops."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class SubscriptionRefused(NotifierError):
    """A topic cannot be followed: the server refused its ``subscribe``
    (``forbidden``, ``invalid_topic``), or ended it after an ``auth`` whose
    new token no longer allows it (``code`` is then ``unsubscribed``)."""

    def __init__(self, topic: str, code: str, message: str):
        super().__init__(f"{topic}: {code}: {message}")
        self.topic = topic
        self.code = code
        self.message = message

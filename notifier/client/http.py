"""Publishing over the HTTP API, with retries that never store twice.

Every request carries an idempotency key (the caller's, or one made here),
and every retry of it sends the same key: when the server stored the message
but the answer was lost (a cut connection, a timeout, a restart), the retry
gets the first answer back and nothing is stored again.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from notifier.client.errors import APIError, Unauthorized, Unreachable
from notifier.client.model import JSON, Published, PublishRequest
from notifier.client.resume import Backoff

# Worth retrying: the server (or a proxy in front of it) is restarting or
# shutting down. Everything else in 4xx/5xx would fail the same way again.
RETRY_STATUSES = frozenset({502, 503, 504})
TIMEOUT_OR_CUT = 599  # Tornado's code for a timeout or a connection closed mid-request


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def _item(topic: str | None, user: str | None, data: JSON, event: str | None,
          idempotency_key: str | None) -> dict[str, JSON]:
    if (topic is None) == (user is None):
        raise ValueError("give exactly one of topic and user")
    item: dict[str, JSON] = {"topic": topic} if topic is not None else {"user": user}
    item["data"] = data
    if event is not None:
        item["event"] = event
    item["idempotency_key"] = idempotency_key or new_idempotency_key()
    return item


def _published(body: Mapping[str, JSON]) -> Published:
    return Published(id=body["id"], topic=body["topic"], seq=body["seq"], time=body["time"])


def error_from_response(response: HTTPResponse) -> APIError:
    code, message = "http_error", response.reason or str(response.code)
    try:
        error = orjson.loads(response.body or b"")["error"]
        code, message = str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    retry_after: float | None = None
    try:
        retry_after = float(response.headers.get("Retry-After", ""))
    except ValueError:
        pass
    kind = Unauthorized if response.code == 401 else APIError
    return kind(response.code, code, message, retry_after)


class HTTPPublisher:
    def __init__(self, base_url: str, api_key: str | None, headers: Mapping[str, str],
                 request_timeout: float, retry_for: float, backoff: Backoff):
        self.base_url = base_url
        self.api_key = api_key
        self.headers = dict(headers)
        self.request_timeout = request_timeout
        self.retry_for = retry_for
        self.backoff = backoff
        self._http: AsyncHTTPClient | None = None

    async def publish(self, topic: str | None, user: str | None, data: JSON, event: str | None,
                      idempotency_key: str | None) -> Published:
        body = await self._post("/api/publish", _item(topic, user, data, event, idempotency_key))
        return _published(body)

    async def publish_batch(self, messages: Iterable[PublishRequest]) -> list[Published]:
        items = [_item(m.topic, m.user, m.data, m.event, m.idempotency_key) for m in messages]
        body = await self._post("/api/publish/batch", {"messages": items})
        return [_published(result) for result in body["results"]]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def _post(self, path: str, body: JSON) -> dict[str, JSON]:
        """POST ``body`` until it is answered 2xx, a status not worth
        retrying comes back, or ``retry_for`` seconds have passed."""
        if self.api_key is None:
            raise Unauthorized(401, "unauthorized", "no API key given to the client")
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        payload = orjson.dumps(body)
        headers = {**self.headers, "Authorization": f"Bearer {self.api_key}",
                   "Content-Type": "application/json"}
        deadline = time.monotonic() + self.retry_for
        attempt = 0
        while True:
            attempt += 1
            failure: BaseException
            wait: float | None = None
            timeout = max(0.1, min(self.request_timeout, deadline - time.monotonic()))
            request = HTTPRequest(self.base_url + path, method="POST", headers=headers,
                                  body=payload, connect_timeout=timeout, request_timeout=timeout)
            try:
                response = await self._http.fetch(request, raise_error=False)
            except ssl.SSLError:
                raise  # a certificate or TLS problem does not go away by itself
            except (OSError, HTTPClientError) as exc:
                if isinstance(exc, HTTPClientError) and exc.code != TIMEOUT_OR_CUT:
                    raise
                failure = exc
            else:
                if 200 <= response.code < 300:
                    answer: dict[str, JSON] = orjson.loads(response.body)
                    return answer
                if response.code == TIMEOUT_OR_CUT and response.error is not None:
                    failure = response.error
                else:
                    error = error_from_response(response)
                    if response.code not in RETRY_STATUSES:
                        raise error
                    failure, wait = error, error.retry_after
            delay = self.backoff.delay(attempt) if wait is None else wait
            if time.monotonic() + delay >= deadline:
                if isinstance(failure, APIError):
                    raise failure
                raise Unreachable(f"{self.base_url}{path}: {failure}") from failure
            await asyncio.sleep(delay)


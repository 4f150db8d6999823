"""Token keys from an identity provider's JWKS (``auth.jwks_url``), by ``kid``.

The set is fetched off the event loop (Tornado's non-blocking HTTP client;
name lookups run in its thread pool), held in memory, and replaced only by a
later fetch that succeeded: while the endpoint is down, the keys fetched
before keep working. A fetch happens at start, every ``refresh_interval``
(every ``min_interval`` while no key is known yet), and when a token names a
``kid`` that is not known; never two starting within ``min_interval``, so a
stream of made-up kids costs the identity provider at most one request per
interval. Concurrent waiters share the fetch in flight.

Only signing keys for the pinned algorithms are kept. A key whose ``alg``
is not pinned, a symmetric (``oct``) key, a key carrying private parts, a
key for encryption (``use`` other than ``sig``) or one without a ``kid`` is
ignored, as is anything PyJWT cannot load.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import jwt
import orjson
from tornado.httpclient import AsyncHTTPClient

from notifier import logs

FETCH_TIMEOUT = 10.0
MAX_JWKS_BYTES = 1024 * 1024
# An RSA key without ``alg`` may verify any of these; other key types have one
# algorithm each, which PyJWT infers from the key type and curve.
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")

Keys = dict[str, dict[str, jwt.PyJWK]]  # kid -> algorithm -> key


def parse_jwks(document: Any, algorithms: list[str]) -> Keys:
    """The usable keys of a JWKS document (already JSON-decoded), by kid and
    algorithm. Raises ValueError when the document is not a JWKS at all."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS: expected an object with a 'keys' list")
    allowed = [a for a in algorithms if a != "none"]
    keys: Keys = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid, alg, kty = jwk.get("kid"), jwk.get("alg"), jwk.get("kty")
        if not isinstance(kid, str) or jwk.get("use", "sig") != "sig" or "d" in jwk \
                or kty == "oct" or kid in keys:
            continue
        if alg is not None:
            candidates = [alg] if alg in allowed else []
        elif kty == "RSA":
            candidates = [a for a in allowed if a in RSA_ALGORITHMS]
        else:
            candidates = [None]  # PyJWT infers the one algorithm from kty and crv
        loaded = {}
        for candidate in candidates:
            try:
                key = jwt.PyJWK(jwk, candidate)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # malformed, or a type PyJWT does not know
            if key.algorithm_name in allowed:
                loaded[key.algorithm_name] = key
        if loaded:
            keys[kid] = loaded
    return keys


class JwksKeys:
    """The keys of one JWKS URL, kept fresh; see the module docstring."""

    def __init__(self, url: str, algorithms: tuple[str, ...], min_interval: float,
                 refresh_interval: float):
        self.url = url
        self.algorithms = list(algorithms)
        self.min_interval = min_interval
        self.refresh_interval = refresh_interval
        # What a reload compares to decide whether these keys can be kept.
        self.settings = (url, tuple(algorithms), min_interval, refresh_interval)
        self.keys: Keys = {}
        self.log = logs.get()
        self._last_fetch = -math.inf  # monotonic start of the last fetch
        self._fetching: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    def get(self, kid: str) -> dict[str, jwt.PyJWK] | None:
        """The key named ``kid``, one PyJWK per algorithm it may verify."""
        return self.keys.get(kid)

    async def refresh(self) -> None:
        """Fetch now, or wait for the fetch in flight. Never raises: a failed
        fetch is logged and the keys stay as they were."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch())
        # Shielded: a waiter that goes away must not cancel everyone's fetch.
        await asyncio.shield(self._fetching)

    async def refresh_for_unknown_kid(self) -> None:
        """A token named a kid that is not known: fetch unless one started
        less than ``min_interval`` ago (then return at once), or wait for the
        one in flight."""
        if self._fetching is None and time.monotonic() - self._last_fetch < self.min_interval:
            return
        await self.refresh()

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_JWKS_BYTES)
        try:
            response = await client.fetch(self.url, request_timeout=FETCH_TIMEOUT,
                                          connect_timeout=FETCH_TIMEOUT,
                                          headers={"Accept": "application/json"})
            keys = parse_jwks(orjson.loads(response.body), self.algorithms)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old keys stay
            self.log.error("jwks.fetch_failed", url=self.url, error=str(exc) or type(exc).__name__,
                           cached_keys=len(self.keys))
            return
        finally:
            client.close()
            self._fetching = None
        self.log.info("jwks.fetched", url=self.url, kids=sorted(keys))
        if not keys:
            self.log.warning("jwks.no_usable_keys", url=self.url,
                             algorithms=",".join(self.algorithms))
        self.keys = keys

    def start(self) -> None:
        """Begin refreshing on schedule, the first fetch at once (needs a running loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_interval if self.keys else self.min_interval)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._fetching is not None:
            self._fetching.cancel()

"""Who may connect and what they may do: JWTs for WebSocket clients, API keys
for backend services. Algorithms are pinned by config; ``alg: none`` and any
algorithm not listed are refused by PyJWT itself.

Token keys come from ``auth.jwt_secret``, ``auth.jwt_public_key_file`` or an
identity provider's JWKS (``auth.jwks_url``, see ``jwks.py``). With a JWKS,
``verify`` stays synchronous while the token's key is cached, which is the
common case; only a token naming an unknown ``kid`` raises ``KeyNotCached``,
and the caller then awaits ``verify_after_fetch``.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from notifier import logs
from notifier.config import AuthConfig, ConfigError
from notifier.jwks import JwksKeys
from notifier.topics import is_valid_pattern, is_valid_user, matches_any, owner_of, personal_topic


# The last second of year 9999: an ``exp`` beyond it is refused rather than
# sent back in ``welcome`` or ``authenticated`` as a number no client can hold.
MAX_EXP = 253402300799


class AuthError(Exception):
    """A token that cannot be accepted; the message says why, never the token."""


class KeyNotCached(AuthError):
    """The token names a JWKS key id this process has not fetched (yet).
    Callers that can wait await ``TokenVerifier.verify_after_fetch``; any
    other caller refuses the token like any AuthError."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated WebSocket user and the claims that bound them."""

    user: str
    expires: int
    topics: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    @property
    def personal_topic(self) -> str:
        return personal_topic(self.user)

    def can_subscribe(self, topic: str) -> bool:
        owner = owner_of(topic)
        if owner is not None and owner != self.user:
            return False  # personal topics stay private whatever the claims say
        return topic == self.personal_topic or matches_any(self.topics, topic)

    def can_publish(self, topic: str) -> bool:
        return matches_any(self.publish, topic)


def _patterns(claims: dict, name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(is_valid_pattern(p) for p in value):
        raise AuthError(f"claim '{name}' must be a list of topic patterns")
    return tuple(value)


def _jwks_settings(config: AuthConfig) -> tuple:
    return (config.jwks_url, tuple(config.jwt_algorithms), config.jwks_min_fetch_interval,
            config.jwks_refresh_interval)


class TokenVerifier:
    """Verifies JWTs against the configured key and pinned algorithms."""

    def __init__(self, config: AuthConfig, jwks: JwksKeys | None = None):
        self.algorithms = list(config.jwt_algorithms)
        self.jwks: JwksKeys | None = None
        if config.jwks_url:
            self.jwks = jwks or JwksKeys(*_jwks_settings(config))
        elif config.jwt_public_key_file:
            self.key: str | bytes = Path(config.jwt_public_key_file).read_bytes()
        else:
            self.key = config.jwt_secret
            logs.hide([config.jwt_secret])
        self.audience = config.audience or None
        self.issuer = config.issuer or None

    async def start(self) -> None:
        """With a JWKS: fetch it once (a failure is logged, and tokens are
        refused until keys arrive), then keep it fresh. Nothing otherwise."""
        if self.jwks is not None:
            self.jwks.start()
            await self.jwks.refresh()

    def stop(self) -> None:
        if self.jwks is not None:
            self.jwks.stop()

    def reloaded(self, config: AuthConfig) -> "TokenVerifier":
        """The verifier for a reloaded ``[auth]``. The same JWKS with the same
        settings keeps its cached keys and schedule; otherwise this one's
        refreshing stops and the new one's starts."""
        same = self.jwks is not None and self.jwks.settings == _jwks_settings(config)
        fresh = TokenVerifier(config, self.jwks if same else None)
        if not same:
            self.stop()
            if fresh.jwks is not None:
                fresh.jwks.start()
        return fresh

    async def verify_after_fetch(self, token: str) -> Identity:
        """``verify`` for a token that raised KeyNotCached: wait for a JWKS
        fetch (or return at once if one started within the minimum
        interval), then verify again; a kid still unknown is refused."""
        await self.jwks.refresh_for_unknown_kid()
        return self.verify(token)

    def _key_for(self, token: str) -> str | bytes | jwt.PyJWK:
        if self.jwks is None:
            return self.key
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError):
            raise AuthError("token malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self.algorithms:
            raise AuthError("token algorithm not allowed")
        if kid is None:
            raise AuthError("token has no key id (kid)")
        keys = self.jwks.get(kid)
        if keys is None:
            raise KeyNotCached("token key id (kid) is unknown")
        if algorithm not in keys:
            raise AuthError("token algorithm does not match its key")
        return keys[algorithm]

    def verify(self, token: str | bytes) -> Identity:
        """The identity a token proves, or AuthError. ``token`` may be the raw
        bytes of a query argument: bytes that are not UTF-8 are a malformed
        token like any other."""
        key = self._key_for(token)
        required = ["sub", "exp"]
        if self.audience:
            required.append("aud")
        if self.issuer:
            required.append("iss")
        try:
            claims = jwt.decode(
                token, key, algorithms=self.algorithms, audience=self.audience,
                issuer=self.issuer, options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid ('iat' or 'nbf' in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature invalid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience invalid") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer invalid") from None
        except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError, RecursionError):
            # Besides its own errors, PyJWT lets some through from hostile
            # headers and claims (e.g. int() of an infinite "exp" in older
            # versions); any of them is a token that cannot be used.
            raise AuthError("token malformed") from None
        user = claims["sub"]
        if not is_valid_user(user):
            raise AuthError("token 'sub' is not usable in a topic name")
        expires = int(claims["exp"])  # PyJWT checked that int() takes it
        if expires > MAX_EXP:
            raise AuthError("token 'exp' is after the year 9999")
        return Identity(
            user=user,
            expires=expires,
            topics=_patterns(claims, "topics"),
            publish=_patterns(claims, "publish"),
        )


def mint_token(secret: str, algorithm: str, user: str, topics: list[str], publish: list[str],
               ttl: float, audience: str = "", issuer: str = "") -> str:
    """A signed token for ``user``; only for symmetric (HS*) algorithms."""
    now = int(time.time())
    claims: dict = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if topics:
        claims["topics"] = topics
    if publish:
        claims["publish"] = publish
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)


class ApiKeys:
    """The bearer keys accepted by the HTTP API; replaceable at run time (SIGHUP)."""

    def __init__(self, keys: list[str]):
        self.keys = [key.encode() for key in keys]
        logs.hide(keys)  # whatever a key looks like, it never reaches a log line

    def accepts(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[len("Bearer "):].strip().encode()
        # Compare against every key so timing says nothing about which one is close.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(given, key)
        return found


@dataclass(frozen=True)
class DevCredentials:
    jwt_secret: str
    api_key: str
    path: Path


def development_credentials(state_dir: Path) -> DevCredentials:
    """A JWT secret and API key for running with no config, kept across restarts
    in the state directory (mode 0600) so minted tokens stay valid."""
    path = state_dir / "dev-credentials.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            return DevCredentials(str(stored["jwt_secret"]), str(stored["api_key"]), path)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is unreadable; delete it to generate new development "
                              "credentials (tokens minted with the old ones stop working)") from None
    state_dir.mkdir(parents=True, exist_ok=True)
    values = {"jwt_secret": secrets.token_urlsafe(32), "api_key": "dev-" + secrets.token_urlsafe(18)}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(values, handle)
    return DevCredentials(values["jwt_secret"], values["api_key"], path)

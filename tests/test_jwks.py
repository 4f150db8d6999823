"""Token keys from a JWKS that the test serves over HTTP and rotates: cached by
kid, refetched for an unknown kid at a bounded rate (counted at the server),
kept while the endpoint is down, refreshed on schedule, filtered by the
pinned algorithms; and the config rules around ``auth.jwks_url``."""

from __future__ import annotations

import asyncio

import pytest
from jwt.algorithms import RSAAlgorithm

from idp import IdentityProvider, SigningKey, claims
from notifier.auth import AuthError, KeyNotCached, TokenVerifier
from notifier.config import AuthConfig, ConfigError, load
from notifier.jwks import parse_jwks
from support import events

MIN_INTERVAL = 0.5


@pytest.fixture(scope="module")
def key_a():
    return SigningKey("key-a")


@pytest.fixture(scope="module")
def key_b():
    return SigningKey("key-b")


@pytest.fixture(scope="module")
def key_es():
    return SigningKey("key-es", "ES256")


@pytest.fixture
def idp():
    provider = IdentityProvider().start()
    yield provider
    provider.stop()


def make_verifier(idp: IdentityProvider, algorithms=("RS256",), min_interval=MIN_INTERVAL,
                  refresh_interval=3600.0) -> TokenVerifier:
    return TokenVerifier(AuthConfig(jwt_algorithms=list(algorithms), jwks_url=idp.url,
                                    jwks_min_fetch_interval=min_interval,
                                    jwks_refresh_interval=refresh_interval))


async def verify(verifier: TokenVerifier, token: str):
    """What the WebSocket handler does: synchronous when the key is cached,
    one awaited fetch when it is not."""
    try:
        return verifier.verify(token)
    except KeyNotCached:
        return await verifier.verify_after_fetch(token)


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        await verify(verifier, token)
    assert token not in str(caught.value)
    return str(caught.value)





class TestRotation:
    async def test_rotation_refetch_rate_and_outage(self, io_loop, idp, key_a, key_b):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        token_a = key_a.sign(claims())
        # Nothing cached yet: the first token waits for the first fetch.
        with pytest.raises(KeyNotCached):
            verifier.verify(token_a)
        assert (await verifier.verify_after_fetch(token_a)).user == "alice"
        assert idp.requests == 1
        # Cached: synchronous, no request.
        assert verifier.verify(key_a.sign(claims("bob"))).user == "bob"
        assert idp.requests == 1

        await asyncio.sleep(MIN_INTERVAL)
        idp.publish(key_b)  # A rotated out
        token_b = key_b.sign(claims("carol"))
        with pytest.raises(KeyNotCached):
            verifier.verify(token_b)
        assert (await verifier.verify_after_fetch(token_b)).user == "carol"
        assert idp.requests == 2
        # A was removed from the set, so its tokens no longer pass.
        assert "unknown" in await refused(verifier, token_a)
        # Another unknown kid within the interval: refused, no request.
        stranger = SigningKey("key-c")
        assert "unknown" in await refused(verifier, stranger.sign(claims()))
        assert idp.requests == 2

        idp.stop()
        assert verifier.verify(key_b.sign(claims("dave"))).user == "dave"
        await asyncio.sleep(MIN_INTERVAL)
        # The interval has passed: the unknown kid tries a fetch, which fails...
        await refused(verifier, stranger.sign(claims()))
        # ...and the cached key still works.
        assert verifier.verify(key_b.sign(claims("erin"))).user == "erin"

    async def test_concurrent_unknown_kids_share_one_fetch(self, io_loop, idp, key_a):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        users = [f"user{n}" for n in range(8)]
        identities = await asyncio.gather(*(verify(verifier, key_a.sign(claims(user)))
                                            for user in users))
        assert [identity.user for identity in identities] == users
        assert idp.requests == 1

    async def test_a_broken_answer_keeps_the_cached_keys(self, io_loop, idp, key_a, key_b,
                                                         captured):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        await verify(verifier, key_a.sign(claims()))
        for status, body in [(500, b"{}"), (200, b"not json"), (200, b'{"keys": 5}')]:
            idp.status, idp.body = status, body
            await asyncio.sleep(MIN_INTERVAL)
            await refused(verifier, key_b.sign(claims()))
            assert verifier.verify(key_a.sign(claims("bob"))).user == "bob"
        assert len(events(captured, "jwks.fetch_failed")) == 3
        assert idp.requests == 4

    async def test_scheduled_refresh_picks_up_a_new_key_without_a_token(
            self, io_loop, idp, key_a, key_b):
        idp.publish(key_a)
        verifier = make_verifier(idp, refresh_interval=0.2)
        await verifier.start()
        try:
            assert idp.requests == 1
            assert verifier.verify(key_a.sign(claims())).user == "alice"
            idp.publish(key_a, key_b)
            for _ in range(100):
                if verifier.jwks.get("key-b") is not None:
                    break
                await asyncio.sleep(0.02)
            assert verifier.verify(key_b.sign(claims("bob"))).user == "bob"
            assert idp.requests >= 2
        finally:
            verifier.stop()
        seen = idp.requests
        await asyncio.sleep(0.5)
        assert idp.requests == seen  # stopped means stopped

    async def test_start_with_the_endpoint_down(self, io_loop, idp, key_a, captured):
        idp.publish(key_a)
        idp.stop()
        verifier = make_verifier(idp, min_interval=0.2)
        await verifier.start()
        try:
            (failed,) = events(captured, "jwks.fetch_failed")
            assert failed["level"] == "error" and failed["url"] == idp.url
            assert failed["cached_keys"] == 0
            await refused(verifier, key_a.sign(claims()))
            idp.start()
            # With no keys the schedule retries every min_interval.
            for _ in range(100):
                if verifier.jwks.get("key-a") is not None:
                    break
                await asyncio.sleep(0.02)
            assert verifier.verify(key_a.sign(claims())).user == "alice"
        finally:
            verifier.stop()

    async def test_reload_keeps_the_cache_when_nothing_changed(self, io_loop, idp, key_a):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        await verify(verifier, key_a.sign(claims()))
        same = verifier.reloaded(AuthConfig(jwt_algorithms=["RS256"], jwks_url=idp.url,
                                            jwks_min_fetch_interval=MIN_INTERVAL,
                                            audience="notifier"))
        assert same.jwks is verifier.jwks and same.audience == "notifier"
        assert same.verify(key_a.sign(claims(aud="notifier"))).user == "alice"
        assert idp.requests == 1
        other = same.reloaded(AuthConfig(jwt_algorithms=["RS256", "ES256"], jwks_url=idp.url,
                                         jwks_min_fetch_interval=MIN_INTERVAL))
        try:
            assert other.jwks is not same.jwks
            for _ in range(100):  # the new set's first fetch starts at once
                if other.jwks.get("key-a") is not None:
                    break
                await asyncio.sleep(0.02)
            assert idp.requests == 2
            assert other.verify(key_a.sign(claims())).user == "alice"
        finally:
            other.stop()


class TestAlgorithms:
    async def test_allowed_kid_with_an_algorithm_not_pinned(self, io_loop, idp, key_a):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        await verify(verifier, key_a.sign(claims()))
        assert "not allowed" in await refused(verifier, key_a.sign(claims(), algorithm="RS512"))
        assert "not allowed" in await refused(verifier, key_a.sign(claims(), algorithm="PS256"))

    async def test_token_algorithm_must_match_the_keys(self, io_loop, idp, key_a):
        idp.publish(key_a)  # alg RS256
        verifier = make_verifier(idp, algorithms=("RS256", "PS256"))
        await verify(verifier, key_a.sign(claims()))
        assert "match" in await refused(verifier, key_a.sign(claims(), algorithm="PS256"))

    async def test_key_without_alg_serves_each_pinned_rsa_algorithm(self, io_loop, idp, key_a):
        idp.keys = [key_a.jwk(alg=None)]
        verifier = make_verifier(idp, algorithms=("RS256", "PS256"))
        assert (await verify(verifier, key_a.sign(claims()))).user == "alice"
        assert verifier.verify(key_a.sign(claims("bob"), algorithm="PS256")).user == "bob"

    async def test_es256_and_rs256_side_by_side(self, io_loop, idp, key_a, key_es):
        idp.publish(key_a, key_es)
        verifier = make_verifier(idp, algorithms=("RS256", "ES256"))
        assert (await verify(verifier, key_es.sign(claims()))).user == "alice"
        assert verifier.verify(key_a.sign(claims("bob"))).user == "bob"
        # A token naming the EC key but claiming RS256 finds no RS256 key there.
        assert "match" in await refused(verifier, key_a.sign(claims(), kid="key-es"))

    async def test_jwk_whose_alg_is_not_pinned_is_ignored(self, io_loop, idp, key_a):
        idp.keys = [key_a.jwk(alg="RS512")]
        verifier = make_verifier(idp)
        assert "unknown" in await refused(verifier, key_a.sign(claims()))
        assert "not allowed" in await refused(verifier, key_a.sign(claims(), algorithm="RS512"))

    async def test_forged_signature_and_no_kid(self, io_loop, idp, key_a, key_b):
        idp.publish(key_a)
        verifier = make_verifier(idp)
        assert "signature" in await refused(verifier, key_b.sign(claims(), kid="key-a"))
        assert "kid" in await refused(verifier, key_a.sign(claims(), kid=None))
        assert "malformed" in await refused(verifier, "not-a-token")

    async def test_alg_none_never(self, io_loop, idp, key_a):
        import base64
        import json

        def part(value) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
        idp.keys = [key_a.jwk(), key_a.jwk(kid="none-key", alg="none")]
        verifier = make_verifier(idp)
        for kid in ("key-a", "none-key"):
            token = f"{part({'alg': 'none', 'kid': kid})}.{part(claims())}."
            assert "not allowed" in await refused(verifier, token)

    async def test_claim_checks_apply_as_with_a_fixed_key(self, io_loop, idp, key_a):
        idp.publish(key_a)
        verifier = TokenVerifier(AuthConfig(jwt_algorithms=["RS256"], jwks_url=idp.url,
                                            audience="notifier", issuer=idp.url))
        good = claims(aud="notifier", iss=idp.url)
        assert (await verify(verifier, key_a.sign(good))).user == "alice"
        assert "audience" in await refused(verifier, key_a.sign({**good, "aud": "other"}))
        assert "expired" in await refused(verifier, key_a.sign(claims(ttl=-5, aud="notifier",
                                                                      iss=idp.url)))


class TestParse:
    def test_only_usable_signing_keys_for_pinned_algorithms(self, key_a, key_b, key_es):
        document = {"keys": [
            key_a.jwk(),
            key_b.jwk(alg="RS512"),                      # alg not pinned
            key_es.jwk(),                                # ES256, not pinned here
            key_a.jwk(kid="enc", use="enc"),             # for encryption
            key_a.jwk(kid=None),                         # no kid
            key_a.jwk(kid=5),                            # kid not a string
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0", "alg": "HS256"},
            {**RSAAlgorithm.to_jwk(key_a.private, as_dict=True),  # private parts
             "kid": "private", "alg": "RS256"},
            {"kty": "RSA", "kid": "broken", "alg": "RS256", "n": "!!", "e": "AQAB"},
            {"kty": "XYZ", "kid": "unknown-type"},
            "not an object",
            key_a.jwk(kid="none", alg="none"),
        ]}
        assert {kid: sorted(keys) for kid, keys in parse_jwks(document, ["RS256"]).items()} == {
            "key-a": ["RS256"]}

    def test_inferred_algorithms(self, key_a, key_es):
        document = {"keys": [key_a.jwk(alg=None), key_es.jwk(alg=None)]}
        keys = parse_jwks(document, ["RS256", "PS512", "ES256", "ES384"])
        assert sorted(keys["key-a"]) == ["PS512", "RS256"]
        assert sorted(keys["key-es"]) == ["ES256"]

    @pytest.mark.parametrize("document", [[], {}, {"keys": {}}, "keys", None])
    def test_not_a_jwks(self, document):
        with pytest.raises(ValueError):
            parse_jwks(document, ["RS256"])


class TestConfig:
    def load(self, **env) -> AuthConfig:
        return load(None, env={f"NOTIFIER_AUTH_{name.upper()}": value
                               for name, value in env.items()}).auth

    def test_defaults(self):
        auth = load(None, env={}).auth
        assert (auth.jwks_url, auth.jwks_refresh_interval, auth.jwks_min_fetch_interval) == (
            "", 3600.0, 30.0)

    def test_jwks_with_public_key_algorithms(self):
        auth = self.load(jwks_url="https://id.example.com/.well-known/jwks.json",
                         jwt_algorithms="RS256,ES256", jwks_refresh_interval="10m",
                         jwks_min_fetch_interval="5s")
        assert (auth.jwks_refresh_interval, auth.jwks_min_fetch_interval) == (600.0, 5.0)

    @pytest.mark.parametrize("env, complaint", [
        ({"jwks_url": "ftp://id.example.com/jwks", "jwt_algorithms": "RS256"}, "auth.jwks_url"),
        ({"jwks_url": "id.example.com/jwks", "jwt_algorithms": "RS256"}, "auth.jwks_url"),
        ({"jwks_url": "https://id.example.com/jwks"}, "auth.jwks_url: needs public-key"),
        ({"jwks_url": "https://id.example.com/jwks", "jwt_secret": "s" * 40,
          "jwt_algorithms": "RS256"}, "auth.jwt_secret"),
        ({"jwks_url": "https://id.example.com/jwks", "jwt_algorithms": "RS256",
          "jwt_public_key_file": __file__}, "not both"),
        ({"jwks_refresh_interval": "0s"}, "auth.jwks_refresh_interval"),
        ({"jwks_min_fetch_interval": "-1s"}, "auth.jwks_min_fetch_interval"),
        ({"jwt_algorithms": "RS256"}, "or set auth.jwks_url"),
    ])
    def test_refused(self, env, complaint):
        with pytest.raises(ConfigError) as caught:
            self.load(**env)
        assert complaint in str(caught.value)

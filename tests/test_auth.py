"""JWT verification with pinned algorithms, identities' rights, API keys."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from notifier.auth import ApiKeys, AuthError, Identity, TokenVerifier, mint_token
from notifier.config import AuthConfig, load

SECRET = "unit-test-secret-" + "k" * 32
OTHER_SECRET = "another-secret-" + "q" * 32
LONG_SECRET = "hs512-needs-64-bytes-" + "z" * 50


def hs256_verifier(**auth) -> TokenVerifier:
    return TokenVerifier(AuthConfig(jwt_secret=SECRET, **auth))


def sign(claims: dict, key=SECRET, algorithm: str = "HS256", headers: dict | None = None) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def claims(**overrides) -> dict:
    body = {"sub": "alice", "exp": int(time.time()) + 600, "topics": ["news.>"],
            "publish": ["chat.*"]}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    message = str(caught.value)
    assert not token or token not in message
    return message


class TestHS256:
    def test_valid_token_gives_identity(self):
        exp = int(time.time()) + 600
        identity = hs256_verifier().verify(sign(claims(exp=exp)))
        assert identity == Identity("alice", exp, ("news.>",), ("chat.*",))

    def test_claims_default_to_no_rights(self):
        exp = int(time.time()) + 60
        identity = hs256_verifier().verify(sign({"sub": "bob", "exp": exp}))
        assert identity == Identity("bob", exp, (), ())

    def test_single_string_pattern_is_one_pattern(self):
        identity = hs256_verifier().verify(sign(claims(topics="news.>", publish="a.b")))
        assert identity.topics == ("news.>",) and identity.publish == ("a.b",)

    def test_missing_sub(self):
        assert "sub" in refused(hs256_verifier(), sign(claims(sub=None)))

    def test_missing_exp(self):
        assert "exp" in refused(hs256_verifier(), sign(claims(exp=None)))

    def test_expired(self):
        assert "expired" in refused(hs256_verifier(), sign(claims(exp=int(time.time()) - 5)))

    def test_wrong_key(self):
        refused(hs256_verifier(), sign(claims(), key=OTHER_SECRET))

    @pytest.mark.parametrize("garbage", ["", "garbage", "a.b.c", "a.b", "....",
                                         "eyJhbGciOiJIUzI1NiJ9.e30", "\u00e9.\u00e9.\u00e9"])
    def test_garbage(self, garbage):
        refused(hs256_verifier(), garbage)

    def test_bytes_tokens_verify_like_text(self):
        token = sign(claims())
        assert hs256_verifier().verify(token.encode()) == hs256_verifier().verify(token)

    @pytest.mark.parametrize("raw", [b"\xff", b"\xff.\xfe.\xfd", b"\xed\xa0\x80", b"eyJ\xc3(.a.b"])
    def test_bytes_that_are_not_utf8_are_malformed(self, raw):
        with pytest.raises(AuthError, match="^token malformed$"):
            hs256_verifier().verify(raw)

    @pytest.mark.parametrize("exp", [253402300800, 10**30, 2**64, 1e300])
    def test_exp_after_year_9999_is_refused(self, exp):
        assert "9999" in refused(hs256_verifier(), sign(claims(exp=exp)))

    def test_exp_at_the_end_of_year_9999_is_accepted(self):
        assert hs256_verifier().verify(sign(claims(exp=253402300799))).expires == 253402300799

    @pytest.mark.parametrize("claim", ["iat", "nbf"])
    @pytest.mark.parametrize("value", [10**30, int(time.time()) + 3600])
    def test_iat_or_nbf_in_the_future_is_refused(self, claim, value):
        assert "not yet valid" in refused(hs256_verifier(), sign(claims(**{claim: value})))

    @pytest.mark.parametrize("payload", [
        '{"sub":"alice","exp":Infinity}', '{"sub":"alice","exp":NaN}', '{"sub":"alice","exp":1e400}',
        '{"sub":"alice","exp":9999999999,"iat":Infinity}', '{"sub":"alice","exp":9999999999,"nbf":-Infinity}',
        '{"sub":"alice","exp":"soon"}', '{"sub":"alice","exp":[1]}', '{"sub":["alice"],"exp":9999999999}',
        '{"sub":"alice","exp":9999999999,"x":%s}' % ("[" * 5000 + "]" * 5000),
    ])
    def test_hostile_claims_signed_with_the_right_key_are_refused(self, payload):
        import hashlib
        import hmac
        header = b64url(b'{"alg":"HS256","typ":"JWT"}')
        body = b64url(payload.encode())
        mac = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
        refused(hs256_verifier(), f"{header}.{body}.{b64url(mac)}")

    def test_a_deeply_nested_header_is_malformed(self):
        header = b64url(b'{"alg":"HS256","x":' + b"[" * 5000 + b"]" * 5000 + b"}")
        assert refused(hs256_verifier(), f"{header}.e30.sig") == "token malformed"

    def test_tampered_payload(self):
        token = sign(claims(topics=["news.>"]))
        header, _, signature = token.split(".")
        forged = b64url(json.dumps(claims(topics=[">"])).encode())
        refused(hs256_verifier(), f"{header}.{forged}.{signature}")

    @pytest.mark.parametrize("alg", ["none", "None", "NONE"])
    def test_alg_none(self, alg):
        header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims()).encode())
        refused(hs256_verifier(), f"{header}.{payload}.")

    def test_hs512_refused_when_only_hs256_is_pinned(self):
        verifier = TokenVerifier(AuthConfig(jwt_secret=LONG_SECRET))
        assert verifier.verify(sign(claims(), key=LONG_SECRET)).user == "alice"
        assert "algorithm" in refused(verifier, sign(claims(), key=LONG_SECRET, algorithm="HS512"))

    def test_hs512_accepted_when_pinned(self):
        verifier = TokenVerifier(AuthConfig(jwt_secret=LONG_SECRET, jwt_algorithms=["HS512"]))
        assert verifier.verify(sign(claims(), key=LONG_SECRET, algorithm="HS512")).user == "alice"
        refused(verifier, sign(claims(), key=LONG_SECRET, algorithm="HS256"))

    @pytest.mark.parametrize("sub", ["", "has space", "a/b", "caf\u00e9", "u" * 196, "a.", "*",
                                     ">", "a..b"])
    def test_sub_not_usable_in_a_topic_name(self, sub):
        assert "sub" in refused(hs256_verifier(), sign(claims(sub=sub)))

    @pytest.mark.parametrize("sub", [5, ["alice"], {"id": 1}])
    def test_sub_not_a_string(self, sub):
        refused(hs256_verifier(), sign(claims(sub=sub)))

    @pytest.mark.parametrize("name", ["topics", "publish"])
    @pytest.mark.parametrize("value", [5, True, {"a": 1}, [5], ["ok", 5], ["bad pattern"],
                                       ["a.>.b"], [""], ["news*"]])
    def test_bad_pattern_claims(self, name, value):
        assert name in refused(hs256_verifier(), sign(claims(**{name: value})))

    def test_exp_in_the_future_is_kept(self):
        exp = int(time.time()) + 3600
        assert hs256_verifier().verify(sign(claims(exp=exp))).expires == exp


class TestAudienceAndIssuer:
    def test_audience_required_when_configured(self):
        verifier = hs256_verifier(audience="notifier")
        assert verifier.verify(sign(claims(aud="notifier"))).user == "alice"
        assert verifier.verify(sign(claims(aud=["other", "notifier"]))).user == "alice"
        assert "aud" in refused(verifier, sign(claims()))
        assert "audience" in refused(verifier, sign(claims(aud="other")))

    def test_issuer_required_when_configured(self):
        verifier = hs256_verifier(issuer="https://id.example.com")
        assert verifier.verify(sign(claims(iss="https://id.example.com"))).user == "alice"
        assert "iss" in refused(verifier, sign(claims()))
        assert "issuer" in refused(verifier, sign(claims(iss="https://evil.example.com")))

    def test_both(self):
        verifier = hs256_verifier(audience="notifier", issuer="me")
        assert verifier.verify(sign(claims(aud="notifier", iss="me"))).user == "alice"
        refused(verifier, sign(claims(aud="notifier")))
        refused(verifier, sign(claims(iss="me")))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class TestPublicKeyAlgorithms:
    def rs256_verifier(self, tmp_path, rsa_key) -> TokenVerifier:
        path = tmp_path / "jwt.pub"
        path.write_bytes(public_pem(rsa_key))
        config = load(None, env={"NOTIFIER_AUTH_JWT_ALGORITHMS": "RS256",
                                 "NOTIFIER_AUTH_JWT_PUBLIC_KEY_FILE": str(path),
                                 "NOTIFIER_AUTH_API_KEYS": "a-key-of-mine"})
        return TokenVerifier(config.auth)

    def test_rs256_accepted(self, tmp_path, rsa_key):
        exp = int(time.time()) + 60
        token = sign(claims(exp=exp), key=rsa_key, algorithm="RS256")
        identity = self.rs256_verifier(tmp_path, rsa_key).verify(token)
        assert identity == Identity("alice", exp, ("news.>",), ("chat.*",))

    def test_rs256_from_another_key_refused(self, tmp_path, rsa_key):
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        refused(self.rs256_verifier(tmp_path, rsa_key),
                sign(claims(), key=other, algorithm="RS256"))

    def test_key_confusion_hs256_signed_with_the_public_key(self, tmp_path, rsa_key):
        import hashlib
        import hmac
        # Built by hand: PyJWT refuses to sign HS256 with a PEM key.
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims(topics=[">"])).encode())
        mac = hmac.new(public_pem(rsa_key), f"{header}.{payload}".encode(), hashlib.sha256)
        token = f"{header}.{payload}.{b64url(mac.digest())}"
        refused(self.rs256_verifier(tmp_path, rsa_key), token)

    def test_alg_none_refused_with_rs256(self, tmp_path, rsa_key):
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims()).encode())
        refused(self.rs256_verifier(tmp_path, rsa_key), f"{header}.{payload}.")

    def test_es256_accepted(self, tmp_path):
        key = ec.generate_private_key(ec.SECP256R1())
        path = tmp_path / "es.pub"
        path.write_bytes(public_pem(key))
        verifier = TokenVerifier(AuthConfig(jwt_algorithms=["ES256"],
                                            jwt_public_key_file=str(path)))
        assert verifier.verify(sign(claims(sub="bob"), key=key, algorithm="ES256")).user == "bob"
        refused(verifier, sign(claims(), key=SECRET, algorithm="HS256"))


class TestRights:
    def identity(self, user="alice", topics=(), publish=()) -> Identity:
        return Identity(user, int(time.time()) + 60, tuple(topics), tuple(publish))

    def test_own_personal_topic_always(self):
        assert self.identity().can_subscribe("user:alice") is True
        assert self.identity().personal_topic == "user:alice"

    @pytest.mark.parametrize("topics", [[">"], ["*"], ["user:*"], ["user:bob"], ["user:bob.>"],
                                        ["*.>"], ["user:*.>"]])
    def test_never_another_users_personal_topic(self, topics):
        identity = self.identity(topics=topics)
        assert identity.can_subscribe("user:bob") is False
        assert identity.can_subscribe("user:bob.inbox") is False

    @pytest.mark.parametrize("topic, allowed", [
        ("news.sport", True), ("news.sport.live", True), ("news", False), ("chat.1", True),
        ("chat.1.x", False), ("other", False),
    ])
    def test_patterns_otherwise(self, topic, allowed):
        assert self.identity(topics=["news.>", "chat.*"]).can_subscribe(topic) is allowed

    def test_no_claims_no_topics(self):
        assert self.identity().can_subscribe("news") is False

    def test_wildcard_claims_reach_public_topics(self):
        assert self.identity(topics=[">"]).can_subscribe("a.b.c") is True

    @pytest.mark.parametrize("topic, allowed", [
        ("chat.1", True), ("chat.1.2", False), ("alerts", True), ("news.a", False),
    ])
    def test_can_publish_by_claims(self, topic, allowed):
        identity = self.identity(topics=["news.>"], publish=["chat.*", "alerts"])
        assert identity.can_publish(topic) is allowed

    def test_no_publish_claims_no_publish(self):
        identity = self.identity(topics=[">"])
        assert identity.can_publish("news") is False
        assert identity.can_publish("user:alice") is False

    @pytest.mark.parametrize("user", ["bob@example.com", "a.b"])
    def test_dotted_users_own_their_personal_topic(self, user):
        # Accepted subs (emails are common) must reach their own offline queue,
        # and nobody else may read it, whatever their claims.
        token = sign(claims(sub=user))
        identity = hs256_verifier().verify(token)
        assert identity.can_subscribe(f"user:{user}") is True
        prefix = user.split(".")[0]
        assert self.identity(user=prefix, topics=[">"]).can_subscribe(f"user:{user}") is False


class TestApiKeys:
    @pytest.mark.parametrize("header, accepted", [
        ("Bearer key-one-123", True),
        ("Bearer key-two-456", True),
        ("Bearer  key-one-123 ", True),
        ("Bearer key-one-12", False),
        ("Bearer key-one-1234", False),
        ("Bearer KEY-ONE-123", False),
        ("key-one-123", False),
        ("Basic key-one-123", False),
        ("Token key-one-123", False),
        ("Bearer ", False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ])
    def test_accepts(self, header, accepted):
        assert ApiKeys(["key-one-123", "key-two-456"]).accepts(header) is accepted

    def test_no_keys_accepts_nothing(self):
        assert ApiKeys([]).accepts("Bearer ") is False
        assert ApiKeys([]).accepts("Bearer anything") is False


class TestMint:
    def test_round_trip(self):
        before = int(time.time())
        token = mint_token(SECRET, "HS256", "carol", ["news.>", "chat.*"], ["chat.*"], 3600)
        identity = hs256_verifier().verify(token)
        assert identity.user == "carol"
        assert identity.topics == ("news.>", "chat.*") and identity.publish == ("chat.*",)
        assert before + 3600 <= identity.expires <= int(time.time()) + 3600

    def test_round_trip_with_audience_and_issuer(self):
        token = mint_token(SECRET, "HS256", "dave", [], [], 60, audience="notifier", issuer="me")
        identity = hs256_verifier(audience="notifier", issuer="me").verify(token)
        assert identity.user == "dave" and identity.topics == () and identity.publish == ()

    def test_minted_with_another_secret_is_refused(self):
        refused(hs256_verifier(), mint_token(OTHER_SECRET, "HS256", "eve", [], [], 60))

    def test_negative_ttl_is_expired(self):
        assert "expired" in refused(hs256_verifier(), mint_token(SECRET, "HS256", "eve", [], [], -10))

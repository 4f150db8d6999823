"""Configuration: TOML file, NOTIFIER_<SECTION>_<KEY> overrides, validation,
and the documented sample config."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from notifier.config import (
    Config, ConfigError, canonical_origin, load, require_api_keys, state_directory,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "notifier.toml"

# Keys SPEC says must exist, with their SPEC defaults (None: SPEC names no default).
SPEC_KEYS = {
    "server.host": "127.0.0.1",
    "server.port": 8765,
    "server.allowed_origins": [],
    "server.drain_timeout": 10.0,
    "auth.jwt_secret": None,
    "auth.jwt_algorithms": ["HS256"],
    "auth.jwt_public_key_file": None,
    "auth.audience": None,
    "auth.issuer": None,
    "auth.api_keys": None,
    "store.backend": "sqlite",
    "store.path": None,
    "store.redis_url": None,
    "retention.max_messages": 10000,
    "retention.max_age": 7 * 86400.0,
    "heartbeat.interval": 25.0,
    "heartbeat.timeout": 10.0,
    "limits.max_message_bytes": 64 * 1024,
    "limits.max_body_bytes": 1024 * 1024,
    "limits.max_buffered_bytes": 1024 * 1024,
    "limits.commands_per_second": 100,
    "limits.commands_burst": 200,
    "limits.publishes_per_second": 0,
    "log.level": None,
}


# One valid value per key, given through its NOTIFIER_<SECTION>_<KEY> variable.
ENV_CASES = [
    ("server.host", "0.0.0.0", "0.0.0.0"),
    ("server.xheaders", "true", True),
    ("server.compression", "yes", True),
    ("server.demo_page", "off", False),
    ("server.port", "9001", 9001),
    ("server.allowed_origins", "https://x.example", ["https://x.example"]),
    ("server.drain_timeout", "3s", 3.0),
    ("auth.jwt_secret", "z" * 40, "z" * 40),
    ("auth.jwt_algorithms", "HS256,HS512", ["HS256", "HS512"]),
    ("auth.audience", "aud", "aud"),
    ("auth.issuer", "iss", "iss"),
    ("auth.jwks_refresh_interval", "10m", 600.0),
    ("auth.jwks_min_fetch_interval", "5s", 5.0),
    ("auth.api_keys", "abcdefgh", ["abcdefgh"]),
    ("store.backend", "sqlite", "sqlite"),
    ("store.path", "/srv/n.db", "/srv/n.db"),
    ("store.redis_url", "redis://10.0.0.1:6379/2", "redis://10.0.0.1:6379/2"),
    ("retention.max_messages", "5", 5),
    ("retention.max_age", "1h", 3600.0),
    ("heartbeat.interval", "5s", 5.0),
    ("heartbeat.timeout", "2s", 2.0),
    ("limits.max_message_bytes", "1KiB", 1024),
    ("limits.max_body_bytes", "4KiB", 4096),
    ("limits.max_buffered_bytes", "8KiB", 8192),
    ("limits.commands_per_second", "7", 7.0),
    ("limits.commands_burst", "9", 9),
    ("limits.publishes_per_second", "3", 3.0),
    ("limits.max_connections", "5000", 5000),
    ("limits.max_connecting", "50", 50),
    ("limits.connections_per_user", "3", 3),
    ("limits.subscriptions_per_connection", "10", 10),
    ("limits.handshake_timeout", "2s", 2.0),
    ("log.level", "warning", "warning"),
]


def get(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def all_keys() -> list[str]:
    config = Config()
    return [f"{section.name}.{key.name}"
            for section in fields(config) for key in fields(getattr(config, section.name))]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notifier.toml"
    path.write_text(text)
    return path


def fails(path=None, env=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, env=env or {})
    message = str(caught.value)
    assert message and "\n" not in message, repr(message)
    return message


class TestDefaults:
    @pytest.mark.parametrize("key", sorted(SPEC_KEYS))
    def test_spec_key_exists_with_spec_default(self, key):
        value = get(Config(), key)
        if SPEC_KEYS[key] is not None:
            assert value == SPEC_KEYS[key]
            assert type(value) is type(SPEC_KEYS[key]) or isinstance(value, float)

    def test_load_with_nothing_gives_the_defaults(self):
        assert load(None, env={}) == Config()

    def test_env_is_os_environ_by_default(self, monkeypatch):
        monkeypatch.setenv("NOTIFIER_SERVER_PORT", "9123")
        assert load().server.port == 9123

    def test_sample_config_loads_and_equals_the_defaults(self):
        assert load(SAMPLE, env={}) == Config()

    def test_sample_config_documents_every_key(self):
        document = tomllib.loads(SAMPLE.read_text())
        documented = {f"{section}.{key}" for section, table in document.items() for key in table}
        assert documented == set(all_keys())

    def test_every_spec_key_is_documented_in_the_sample(self):
        document = tomllib.loads(SAMPLE.read_text())
        for key in SPEC_KEYS:
            section, name = key.split(".")
            assert name in document[section], key


class TestFile:
    def test_values_from_toml(self, tmp_path):
        path = write(tmp_path, """
[server]
host = "0.0.0.0"
port = 9000
allowed_origins = ["https://app.example.com", "http://localhost:3000"]
drain_timeout = "30s"
[auth]
jwt_secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
audience = "notifier"
issuer = "https://issuer.example.com"
api_keys = ["key-one-1", "key-two-2"]
[store]
path = "/tmp/n.db"
[retention]
max_messages = 50
max_age = "36h"
[heartbeat]
interval = "250ms"
timeout = 2
[limits]
max_message_bytes = "16KiB"
max_body_bytes = 2097152
max_buffered_bytes = "2MiB"
commands_per_second = 2.5
commands_burst = 5
publishes_per_second = 10
[log]
level = "DEBUG"
""")
        config = load(path, env={})
        assert config.server.host == "0.0.0.0" and config.server.port == 9000
        assert config.server.allowed_origins == ["https://app.example.com", "http://localhost:3000"]
        assert config.server.drain_timeout == 30.0
        assert config.auth.jwt_secret == "s3cret-s3cret-s3cret-s3cret-s3cret"
        assert config.auth.audience == "notifier"
        assert config.auth.issuer == "https://issuer.example.com"
        assert config.auth.api_keys == ["key-one-1", "key-two-2"]
        assert config.store.path == "/tmp/n.db"
        assert config.retention.max_messages == 50 and config.retention.max_age == 36 * 3600.0
        assert config.heartbeat.interval == 0.25 and config.heartbeat.timeout == 2.0
        assert config.limits.max_message_bytes == 16384
        assert config.limits.max_body_bytes == 2097152
        assert config.limits.max_buffered_bytes == 2 * 1024 * 1024
        assert config.limits.commands_per_second == 2.5 and config.limits.commands_burst == 5
        assert config.limits.publishes_per_second == 10.0
        assert config.log.level == "debug"

    def test_a_partial_file_keeps_other_defaults(self, tmp_path):
        config = load(write(tmp_path, "[server]\nport = 1234\n"), env={})
        expected = Config()
        expected.server.port = 1234
        assert config == expected

    def test_env_overrides_the_file(self, tmp_path):
        path = write(tmp_path, "[server]\nport = 1234\nhost = \"0.0.0.0\"\n")
        config = load(path, env={"NOTIFIER_SERVER_PORT": "4321"})
        assert config.server.port == 4321 and config.server.host == "0.0.0.0"


class TestDurations:
    @pytest.mark.parametrize("text, seconds", [
        ("30s", 30.0), ("7d", 604800.0), ("250ms", 0.25), ("10m", 600.0), ("1h", 3600.0),
        ("2w", 1209600.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("45", 45.0), ("0.5", 0.5),
        ("30S", 30.0), (" 30s ", 30.0),
    ])
    def test_duration_from_env(self, text, seconds):
        assert load(None, env={"NOTIFIER_HEARTBEAT_INTERVAL": text}).heartbeat.interval == seconds

    @pytest.mark.parametrize("toml, seconds", [('"30s"', 30.0), ("30", 30.0), ("0.25", 0.25),
                                                ('"7d"', 604800.0)])
    def test_duration_from_toml(self, tmp_path, toml, seconds):
        config = load(write(tmp_path, f"[retention]\nmax_age = {toml}\n"), env={})
        assert config.retention.max_age == seconds


class TestSizes:
    @pytest.mark.parametrize("text, size", [
        ("64KiB", 65536), ("1MiB", 1048576), ("1mib", 1048576), ("64kb", 64000), ("2048", 2048),
        ("512B", 512), ("1GiB", 1024**3),
    ])
    def test_size_from_env(self, text, size):
        env = {"NOTIFIER_LIMITS_MAX_MESSAGE_BYTES": text}
        assert load(None, env=env).limits.max_message_bytes == size

    @pytest.mark.parametrize("toml, size", [('"64KiB"', 65536), ("1000", 1000), ('"1 MiB"', 1048576)])
    def test_size_from_toml(self, tmp_path, toml, size):
        config = load(write(tmp_path, f"[limits]\nmax_body_bytes = {toml}\n"), env={})
        assert config.limits.max_body_bytes == size


class TestEnvironment:
    @pytest.mark.parametrize("text, values", [
        ("k1-aaaaaaaa", ["k1-aaaaaaaa"]),
        ("k1-aaaaaaaa,k2-bbbbbbbb", ["k1-aaaaaaaa", "k2-bbbbbbbb"]),
        (" k1-aaaaaaaa , k2-bbbbbbbb ,", ["k1-aaaaaaaa", "k2-bbbbbbbb"]),
        ("", []),
    ])
    def test_lists_are_comma_separated(self, text, values):
        assert load(None, env={"NOTIFIER_AUTH_API_KEYS": text}).auth.api_keys == values

    def test_origins_list_from_env(self):
        env = {"NOTIFIER_SERVER_ALLOWED_ORIGINS": "https://a.example.com,http://localhost:8080"}
        assert load(None, env=env).server.allowed_origins == ["https://a.example.com",
                                                              "http://localhost:8080"]

    @pytest.mark.parametrize("text, value", [
        ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
        ("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
    ])
    def test_booleans(self, text, value):
        assert load(None, env={"NOTIFIER_SERVER_XHEADERS": text}).server.xheaders is value

    def test_integers_and_floats(self):
        config = load(None, env={"NOTIFIER_SERVER_PORT": "9000",
                                 "NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "12.5",
                                 "NOTIFIER_LIMITS_COMMANDS_BURST": "30"})
        assert config.server.port == 9000
        assert config.limits.commands_per_second == 12.5 and config.limits.commands_burst == 30

    def test_unrelated_variables_are_ignored(self):
        assert load(None, env={"HOME": "/root", "NOTIFIERX": "1", "notifier_server_port": "1"}) \
            == Config()

    @pytest.mark.parametrize("key, text, expected", ENV_CASES)
    def test_every_spec_key_has_its_env_variable(self, key, text, expected):
        name = "NOTIFIER_" + key.replace(".", "_").upper()
        # A configured secret needs an API key next to it (the default has none).
        env = {name: text, "NOTIFIER_AUTH_API_KEYS": "a-key-of-mine"} if key == "auth.jwt_secret" \
            else {name: text}
        assert get(load(None, env=env), key) == expected

    def test_public_key_file_from_env(self, tmp_path):
        pem = tmp_path / "key.pem"
        pem.write_text("-----BEGIN PUBLIC KEY-----\n")
        env = {"NOTIFIER_AUTH_JWT_PUBLIC_KEY_FILE": str(pem), "NOTIFIER_AUTH_JWT_ALGORITHMS": "RS256",
               "NOTIFIER_AUTH_API_KEYS": "a-key-of-mine"}
        config = load(None, env=env)
        assert config.auth.jwt_public_key_file == str(pem)
        assert config.auth.jwt_algorithms == ["RS256"]

    def test_every_config_field_has_an_env_variable(self):
        # These two need other keys beside them (tested in test_auth.py, test_jwks.py).
        covered = {case[0] for case in ENV_CASES} | {"auth.jwt_public_key_file", "auth.jwks_url"}
        assert covered == set(all_keys())


class TestBadValues:
    @pytest.mark.parametrize("env, key", [
        ({"NOTIFIER_SERVER_PORT": "http"}, "server.port"),
        ({"NOTIFIER_SERVER_PORT": "80.5"}, "server.port"),
        ({"NOTIFIER_SERVER_PORT": "70000"}, "server.port"),
        ({"NOTIFIER_SERVER_PORT": "-1"}, "server.port"),
        ({"NOTIFIER_SERVER_XHEADERS": "maybe"}, "server.xheaders"),
        ({"NOTIFIER_SERVER_DRAIN_TIMEOUT": "soon"}, "server.drain_timeout"),
        ({"NOTIFIER_SERVER_DRAIN_TIMEOUT": "-1"}, "server.drain_timeout"),
        ({"NOTIFIER_SERVER_ALLOWED_ORIGINS": "app.example.com"}, "server.allowed_origins"),
        ({"NOTIFIER_SERVER_ALLOWED_ORIGINS": "https://a.example.com/path"}, "server.allowed_origins"),
        ({"NOTIFIER_AUTH_JWT_SECRET": "short"}, "auth.jwt_secret"),
        ({"NOTIFIER_AUTH_JWT_ALGORITHMS": ""}, "auth.jwt_algorithms"),
        ({"NOTIFIER_AUTH_JWT_ALGORITHMS": "none"}, "auth.jwt_algorithms"),
        ({"NOTIFIER_AUTH_JWT_ALGORITHMS": "HS999"}, "auth.jwt_algorithms"),
        ({"NOTIFIER_AUTH_JWT_ALGORITHMS": "HS256,RS256"}, "auth.jwt_algorithms"),
        ({"NOTIFIER_AUTH_JWT_ALGORITHMS": "RS256"}, "auth.jwt_public_key_file"),
        ({"NOTIFIER_AUTH_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, "auth.jwt_public_key_file"),
        ({"NOTIFIER_AUTH_API_KEYS": "short"}, "auth.api_keys"),
        ({"NOTIFIER_STORE_BACKEND": "mysql"}, "store.backend"),
        ({"NOTIFIER_RETENTION_MAX_MESSAGES": "0"}, "retention.max_messages"),
        ({"NOTIFIER_RETENTION_MAX_MESSAGES": "many"}, "retention.max_messages"),
        ({"NOTIFIER_RETENTION_MAX_AGE": "0s"}, "retention.max_age"),
        ({"NOTIFIER_RETENTION_MAX_AGE": "7 days"}, "retention.max_age"),
        ({"NOTIFIER_RETENTION_MAX_AGE": "-5s"}, "retention.max_age"),
        ({"NOTIFIER_HEARTBEAT_INTERVAL": "0"}, "heartbeat.interval"),
        ({"NOTIFIER_HEARTBEAT_INTERVAL": "25 seconds"}, "heartbeat.interval"),
        ({"NOTIFIER_HEARTBEAT_INTERVAL": ""}, "heartbeat.interval"),
        ({"NOTIFIER_HEARTBEAT_TIMEOUT": "-1"}, "heartbeat.timeout"),
        ({"NOTIFIER_LIMITS_MAX_MESSAGE_BYTES": "0"}, "limits.max_message_bytes"),
        ({"NOTIFIER_LIMITS_MAX_MESSAGE_BYTES": "64 parsecs"}, "limits.max_message_bytes"),
        ({"NOTIFIER_LIMITS_MAX_MESSAGE_BYTES": "1.5MiB"}, "limits.max_message_bytes"),
        ({"NOTIFIER_LIMITS_MAX_BODY_BYTES": "-1"}, "limits.max_body_bytes"),
        ({"NOTIFIER_LIMITS_MAX_BUFFERED_BYTES": "lots"}, "limits.max_buffered_bytes"),
        ({"NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "0"}, "limits.commands_per_second"),
        ({"NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "fast"}, "limits.commands_per_second"),
        ({"NOTIFIER_LIMITS_COMMANDS_BURST": "0"}, "limits.commands_burst"),
        ({"NOTIFIER_LIMITS_COMMANDS_BURST": "2.5"}, "limits.commands_burst"),
        ({"NOTIFIER_LIMITS_PUBLISHES_PER_SECOND": "-1"}, "limits.publishes_per_second"),
        ({"NOTIFIER_LOG_LEVEL": "loud"}, "log.level"),
    ])
    def test_bad_env_value_names_the_key(self, env, key):
        assert key in fails(env=env)

    def test_serving_with_a_configured_secret_and_no_api_keys_is_refused(self, tmp_path):
        # Only development credentials (no secret) make up a key of their own;
        # otherwise an empty list would leave every HTTP API call with a 401.
        def refusal(config) -> str:
            with pytest.raises(ConfigError) as raised:
                require_api_keys(config)
            return str(raised.value)

        secret = load(None, env={"NOTIFIER_AUTH_JWT_SECRET": "z" * 40})  # fine for token, subscribe
        message = refusal(secret)
        assert message.startswith("auth.api_keys: ") and "auth.jwt_secret" in message
        pem = tmp_path / "key.pem"
        pem.write_text("-----BEGIN PUBLIC KEY-----\n")
        public = load(None, env={"NOTIFIER_AUTH_JWT_PUBLIC_KEY_FILE": str(pem),
                                 "NOTIFIER_AUTH_JWT_ALGORITHMS": "RS256"})
        assert "auth.jwt_public_key_file" in refusal(public)
        require_api_keys(load(None, env={}))  # development credentials fill it in
        require_api_keys(load(None, env={"NOTIFIER_AUTH_JWT_SECRET": "z" * 40,
                                         "NOTIFIER_AUTH_API_KEYS": "a-key-of-mine"}))

    @pytest.mark.parametrize("toml, key", [
        ('[server]\nport = "8765"', "server.port"),
        ("[server]\nport = 8765.0", "server.port"),
        ("[server]\nport = true", "server.port"),
        ("[server]\nhost = 127", "server.host"),
        ('[server]\nallowed_origins = "https://a.example.com"', "server.allowed_origins"),
        ("[server]\nallowed_origins = [1, 2]", "server.allowed_origins"),
        ('[server]\nxheaders = "yes"', "server.xheaders"),
        ("[server]\ndrain_timeout = true", "server.drain_timeout"),
        ('[server]\ndrain_timeout = "10 sec"', "server.drain_timeout"),
        ('[auth]\njwt_algorithms = "HS256"', "auth.jwt_algorithms"),
        ("[auth]\napi_keys = [12345678]", "auth.api_keys"),
        ("[retention]\nmax_messages = 1.5", "retention.max_messages"),
        ('[retention]\nmax_messages = "10000"', "retention.max_messages"),
        ("[retention]\nmax_age = [1]", "retention.max_age"),
        ("[limits]\nmax_message_bytes = 1.5", "limits.max_message_bytes"),
        ("[limits]\nmax_message_bytes = true", "limits.max_message_bytes"),
        ('[limits]\ncommands_per_second = "100"', "limits.commands_per_second"),
        ("[limits]\ncommands_per_second = false", "limits.commands_per_second"),
        ("[log]\nlevel = 10", "log.level"),
    ])
    def test_bad_toml_value_names_the_key(self, tmp_path, toml, key):
        assert key in fails(write(tmp_path, toml + "\n"))

    @pytest.mark.parametrize("env, key", [
        ({"NOTIFIER_HEARTBEAT_INTERVAL": "nan"}, "heartbeat.interval"),
        ({"NOTIFIER_RETENTION_MAX_AGE": "nan"}, "retention.max_age"),
        ({"NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "nan"}, "limits.commands_per_second"),
    ])
    def test_not_a_number_is_bad_config(self, env, key):
        # "nan" compares False with everything, so range checks alone let it through.
        assert key in fails(env=env)

    @pytest.mark.parametrize("toml, key", [
        ("[heartbeat]\ninterval = nan", "heartbeat.interval"),
    ])
    def test_toml_nan_is_bad_config(self, tmp_path, toml, key):
        assert key in fails(write(tmp_path, toml + "\n"))

    def test_unknown_key_is_named(self, tmp_path):
        message = fails(write(tmp_path, "[server]\nprot = 1\n"))
        assert "server.prot" in message

    def test_unknown_section_is_named(self, tmp_path):
        message = fails(write(tmp_path, "[serverr]\nport = 1\n"))
        assert "serverr" in message

    def test_top_level_key_is_refused(self, tmp_path):
        assert "port" in fails(write(tmp_path, "port = 1\n"))

    def test_section_that_is_not_a_table(self, tmp_path):
        assert "server" in fails(write(tmp_path, "server = 5\n"))

    @pytest.mark.parametrize("name", ["NOTIFIER_SERVER_PROT", "NOTIFIER_NOPE_PORT", "NOTIFIER_SERVER",
                                      "NOTIFIER_", "NOTIFIER_PORT"])
    def test_unknown_env_variable_is_named(self, name):
        assert name in fails(env={name: "1"})

    def test_invalid_toml_is_one_line(self, tmp_path):
        message = fails(write(tmp_path, "[server\nport = = 1\n"))
        assert "notifier.toml" in message

    def test_missing_file_is_one_line(self, tmp_path):
        message = fails(tmp_path / "missing.toml")
        assert "missing.toml" in message


class TestStateDirectory:
    def test_systemd_state_directory(self):
        assert state_directory({"STATE_DIRECTORY": "/var/lib/notifier"}) == Path("/var/lib/notifier")

    def test_first_of_several(self):
        assert state_directory({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path("/var/lib/a")

    @pytest.mark.parametrize("env", [{}, {"STATE_DIRECTORY": ""}, {"HOME": "/root"}])
    def test_else_var(self, env):
        assert state_directory(env) == Path("var")

    def test_reads_os_environ_by_default(self, monkeypatch, tmp_path):
        monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
        assert state_directory() == tmp_path
        monkeypatch.delenv("STATE_DIRECTORY")
        assert state_directory() == Path("var")



@pytest.mark.parametrize("given, canonical", [
    ("https://app.example.com", "https://app.example.com"),
    ("HTTPS://App.Example.COM/", "https://app.example.com"),
    ("https://app.example.com:443", "https://app.example.com"),
    ("http://app.example.com:80", "http://app.example.com"),
    ("http://app.example.com:443", "http://app.example.com:443"),
    ("https://app.example.com:8443", "https://app.example.com:8443"),
    ("http://[::1]:3000", "http://[::1]:3000"),
    ("null", "null"),
])
def test_canonical_origin(given, canonical):
    assert canonical_origin(given) == canonical

"""The OpenAPI document at ``/api/openapi.json`` is served without a key,
names every route, and stays true: schemathesis runs every operation of it
against a live ``notifier serve``, with valid and invalid data (``--mode
all``) and every check (no 5xx, each status and header documented, bodies
matching their schemas, invalid data refused with a 4xx, missing auth
refused, undeclared methods 405 with ``Allow``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import tornado.httpclient

from notifier.app import make_app
from notifier.handlers import static
from notifier.openapi import build
from procs import ServerProcess
from support import API_KEY, api, token

CONFIG = Path(__file__).with_name("schemathesis.toml")
# Per operation, each of the examples, coverage and fuzzing phases; about
# 15 s for the whole document on one core.
MAX_EXAMPLES = 100


async def test_served_without_a_key_and_names_every_route(port, services):
    app = make_app(services)
    status, document = await api(port, "GET", "/api/openapi.json", key=None)
    assert status == 200
    assert document == build() and document["openapi"] == "3.1.0"
    # Every route but the browser client's files and the demo page, which are not API.
    routes = [rule.matcher.regex for rule in app.wildcard_router.rules
              if rule.target is not static.FileHandler]
    examples = [re.sub(r"\{\w+\}", "x", path) for path in document["paths"]]
    # Each documented path is served by exactly one route, and each route serves one.
    served = [[index for index, route in enumerate(routes) if route.fullmatch(example)]
              for example in examples]
    assert all(len(indexes) == 1 for indexes in served), list(zip(examples, served))
    assert sorted(index for (index,) in served) == list(range(len(routes)))


def test_every_error_answer_uses_the_error_schema():
    for path, operations in build()["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                # /readyz answers a probe's {"status"} object, 503 included.
                if status.startswith(("4", "5")) and path != "/readyz":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, (
                        method, path, status)


@pytest.mark.parametrize("path, key, allow", [
    ("/ws", "jwt", "GET"), ("/api/publish", API_KEY, "POST"), ("/api/stats", API_KEY, "GET"),
    ("/api/users/alice/disconnect", API_KEY, "POST"), ("/healthz", None, "GET"),
])
async def test_undeclared_method_is_405_naming_the_allowed_ones(port, path, key, allow):
    # Found by schemathesis: no Allow header, and PUT /ws with a valid token got 400.
    headers = {} if key is None else {
        "Authorization": f"Bearer {token('alice') if key == 'jwt' else key}"}
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", method="PUT", body=b"{}", headers=headers,
        raise_error=False)
    assert response.code == 405 and response.headers.get("Allow") == allow
    assert orjson.loads(response.body)["error"]["code"] in ("method_not_allowed", "bad_request")


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path):
    with ServerProcess(tmp_path, env={"NOTIFIER_LOG_LEVEL": "warning"}) as server:
        env = {**os.environ, "NOTIFIER_TEST_API_KEY": API_KEY,
               "NOTIFIER_TEST_JWT": token("alice", ttl=3600)}
        result = subprocess.run(
            [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "--no-color", "--config-file", str(CONFIG), "run", f"{server.url}/api/openapi.json",
             "--mode", "all", "--max-examples", str(MAX_EXAMPLES),
             "--workers", "1", "--request-timeout", "10", "--report-dir", str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-15000:]
        # All but GET /api/openapi.json, which schemathesis leaves out when it
        # loads the document from there (tested above instead).
        operations = sum(len(methods) for methods in build()["paths"].values())
        assert f"Tested: {operations - 1}" in output, output[-3000:]
        assert server.running()
    for line in server.events():
        assert line.get("level") not in ("error", "critical"), line

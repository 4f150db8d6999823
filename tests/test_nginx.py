"""A real nginx (Debian package) with config/nginx.conf in front of a real
`notifier serve`: WebSocket and HTTP API through the proxy, the client's
address passed on and honoured (server.xheaders = true), tokens kept out of
the access log, oversized bodies refused as JSON."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import tornado.httpclient
import tornado.websocket

from notifier.config import Config
from procs import ROOT, ServerProcess, free_port
from support import API_KEY, Client, in_ci, token

SITE = ROOT / "config" / "nginx.conf"
# The client's own address: loopback, but not 127.0.0.1 (which is where
# nginx connects to notifier from), so notifier can only log it if it took
# it from the proxy's headers.
CLIENT_IP = "127.0.0.2"
SPOOFED = "203.0.113.7"


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                     else None)
    if path is None:
        if in_ci():
            pytest.fail("nginx is missing (Debian: apt-get install nginx-light)")
        pytest.skip("nginx is not installed")
    return path


def site_config(nginx_port: int, notifier_port: int, ws_log: Path) -> str:
    """config/nginx.conf with the three values its header says to rewrite."""
    text = SITE.read_text()
    for old, new in [
        ("listen 8080;", f"listen 127.0.0.1:{nginx_port};"),
        ("server 127.0.0.1:8765;", f"server 127.0.0.1:{notifier_port};"),
        ("access_log /var/log/nginx/notifier-ws.log ", f"access_log {ws_log} "),
    ]:
        assert text.count(old) == 1, f"config/nginx.conf should say {old!r} exactly once"
        text = text.replace(old, new)
    return text


def main_config(directory: Path, site: Path) -> str:
    temp = {name: directory / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    # As root, nginx would hand its workers to "nobody", who cannot enter
    # pytest's private temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {directory / "access.log"};
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""


class Nginx:
    def __init__(self, directory: Path, notifier_port: int):
        self.directory = directory
        self.port = free_port()
        self.ws_log = directory / "notifier-ws.log"
        site = directory / "notifier.conf"
        site.write_text(site_config(self.port, notifier_port, self.ws_log))
        self.conf = directory / "nginx.conf"
        self.conf.write_text(main_config(directory, site))
        self.process: subprocess.Popen | None = None

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, binary: str) -> None:
        with open(self.directory / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(
                [binary, "-e", str(self.directory / "error.log"), "-p", str(self.directory),
                 "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                output = (self.directory / "nginx.out").read_text(errors="replace")
                raise AssertionError(f"nginx exited with {self.process.returncode}:\n"
                                     f"{output}\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx does not listen:\n" + self.error_log()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = nginx_binary()
    directory = tmp_path_factory.mktemp("nginx")
    with ServerProcess(directory, env={"NOTIFIER_SERVER_XHEADERS": "true"}) as notifier:
        nginx = Nginx(directory, notifier.port)
        try:
            nginx.start(binary)
            yield nginx, notifier
        finally:
            nginx.stop()


async def connect_via(port: int, jwt: str, headers: dict | None = None) -> Client:
    request = tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{port}/ws?token={quote(jwt)}", headers=headers or {},
        network_interface=CLIENT_IP)
    client = Client(await tornado.websocket.websocket_connect(request))
    await client.expect("welcome")
    await client.expect("subscribed")
    return client


async def http_via(port: int, method: str, path: str, body: bytes | None,
                   headers: dict | None = None) -> tuple[int, dict, dict]:
    all_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                   **(headers or {})}
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", method=method, headers=all_headers, body=body,
        raise_error=False, network_interface=CLIENT_IP)
    return response.code, dict(response.headers), orjson.loads(response.body or b"null")


async def test_subscribe_and_publish_through_nginx_with_client_address(io_loop, stack):
    nginx, notifier = stack
    # The client claims another address; nginx appends the real one, and
    # notifier must believe nginx (X-Real-IP), not the client.
    spoof = {"X-Forwarded-For": SPOOFED}
    client = await connect_via(nginx.port, token("carol", topics=["news.>"]), spoof)
    await client.send({"type": "subscribe", "topic": "news.proxy", "ref": 1})
    subscribed = await client.expect("subscribed")
    assert (subscribed["ref"], subscribed["topic"]) == (1, "news.proxy")

    status, _, receipt = await http_via(
        nginx.port, "POST", "/api/publish",
        orjson.dumps({"topic": "news.proxy", "data": {"via": "nginx"}}), spoof)
    assert status == 200, receipt
    message = await client.expect("message")
    assert (message["topic"], message["seq"], message["id"], message["data"]) == (
        "news.proxy", receipt["seq"], receipt["id"], {"via": "nginx"})
    await client.send({"type": "ping", "ref": 2})
    assert (await client.expect("pong"))["ref"] == 2
    client.close()

    opened = notifier.wait_for_event("connection.open", user="carol")
    assert opened["ip"] == CLIENT_IP
    published = notifier.wait_for_event("http.request", path="/api/publish", status=200)
    assert published["ip"] == CLIENT_IP


async def test_websocket_access_log_has_no_token(io_loop, stack):
    nginx, _ = stack
    jwt = token("dave", topics=["news.>"])
    client = await connect_via(nginx.port, jwt)
    client.close()
    await client.closed()
    line = re.compile(rf"^{re.escape(CLIENT_IP)} .*\"GET /ws HTTP/1.1\" 101 ", re.M)
    deadline = time.monotonic() + 5
    while not (nginx.ws_log.exists() and line.search(nginx.ws_log.read_text())):
        assert time.monotonic() < deadline, "no /ws line in the access log:\n" + (
            nginx.ws_log.read_text() if nginx.ws_log.exists() else "(no file)")
        time.sleep(0.05)
    text = nginx.ws_log.read_text()
    assert "token" not in text and jwt not in text and jwt.split(".")[1] not in text


async def test_oversized_body_is_refused_as_json(io_loop, stack):
    nginx, notifier = stack
    body = orjson.dumps({"topic": "news.big", "data": "x" * (1024 * 1024)})
    status, headers, answer = await http_via(nginx.port, "POST", "/api/publish", body)
    assert status == 413
    assert headers["Content-Type"].startswith("application/json")
    # nginx's own answer (notifier's would name limits.max_message_bytes).
    assert answer == {"error": {"code": "too_large",
                                "message": "request body is larger than 1 MiB"}}
    assert notifier.request("GET", "/api/topics/news.big/messages")[1]["head"] == 0


def location_block(text: str, location: str) -> str:
    start = text.index(f"location {location} {{")
    return text[start:text.index("\n    }", start)]


def test_websocket_timeouts_outlast_the_heartbeat():
    # nginx must not cut an idle but healthy WebSocket: a live connection
    # hears from notifier every heartbeat.interval + heartbeat.timeout at worst.
    ws = location_block(SITE.read_text(), "= /ws")
    defaults = Config().heartbeat
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = re.findall(rf"^\s*{directive} (\d+)s;", ws, re.M)
        assert int(value) > defaults.interval + defaults.timeout, directive
    assert re.search(r"^\s*proxy_http_version 1\.1;", ws, re.M)
    assert re.search(r"^\s*proxy_set_header Upgrade \$http_upgrade;", ws, re.M)
    assert re.search(r"^\s*proxy_set_header Connection \$connection_upgrade;", ws, re.M)

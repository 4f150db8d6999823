"""The one seam for private Tornado and asyncio attributes: checked at
start-up, and a missing one refuses the start with one line naming the
Tornado version, rather than failing connection by connection."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import tornado

from notifier import internals
from procs import ROOT, base_environment, free_port
from support import API_KEY, SECRET


def test_this_tornado_has_everything():
    internals.check()


@pytest.mark.parametrize("missing", ["_as_list", "_combined_cache"])
def test_missing_header_dict_is_named_with_the_version(monkeypatch, missing):
    monkeypatch.setattr(internals, "_HEADER_DICTS", (missing + "_gone",))
    with pytest.raises(internals.InternalsMissing) as raised:
        internals.check()
    line = str(raised.value)
    assert "\n" not in line
    assert f"tornado {tornado.version}" in line
    assert f"HTTPHeaders.{missing}_gone is missing" in line


# Runs ``notifier serve`` in a Python where one attribute notifier reads has
# been taken away, as a Tornado release that renamed it would.
_WITHOUT = {
    "_compressor": """
        import tornado.websocket as websocket
        original = websocket.WebSocketProtocol13.__init__
        def init(self, *args):
            original(self, *args)
            del self._compressor
        websocket.WebSocketProtocol13.__init__ = init
    """,
    "_write_buffer": """
        import tornado.iostream as iostream
        original = iostream.IOStream.__init__
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            del self._write_buffer
        iostream.IOStream.__init__ = init
    """,
    "_handle_message": """
        import tornado.websocket as websocket
        del websocket.WebSocketProtocol13._handle_message
    """,
    "_headers": """
        import tornado.web as web
        original = web.RequestHandler.clear
        def clear(self):
            original(self)
            del self._headers
        web.RequestHandler.clear = clear
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("attribute", sorted(_WITHOUT))
def test_serve_refuses_to_start_without_an_internal(tmp_path, attribute):
    script = textwrap.dedent(_WITHOUT[attribute]) + textwrap.dedent("""
        import sys
        from notifier.cli import main
        sys.exit(main(["serve"]))
    """)
    env = base_environment()
    env.update({"NOTIFIER_SERVER_PORT": str(free_port()), "NOTIFIER_AUTH_JWT_SECRET": SECRET,
                "NOTIFIER_AUTH_API_KEYS": API_KEY,
                "NOTIFIER_STORE_PATH": str(tmp_path / "notifier.db")})
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"notifier: tornado {tornado.version}: ")
    assert attribute in lines[0]
    assert not (tmp_path / "notifier.db").exists()  # refused before the store was touched

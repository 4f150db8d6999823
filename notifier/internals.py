"""Every private Tornado and asyncio attribute notifier reads, in one place.

Each one buys speed or memory on a hot path, and none is a promise its
library made. ``check()`` runs at start-up: if any is missing (a Tornado or
Python release moved it), the server refuses to start with one line naming
the version, instead of failing connection by connection. Nothing outside
this module names them.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any, Callable, Sized

import tornado
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.iostream import IOStream
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketProtocol13, _WebSocketParams


class InternalsMissing(Exception):
    """A private attribute notifier relies on is not there; one line."""


# HTTPHeaders keeps its fields in these dicts; emptying them in place frees
# a finished handshake's headers (Tornado's get() holds the object for the
# connection's whole life). Tornado before 6.5.3 had _dict for the second.
_HEADER_DICTS = ("_as_list", "_combined_cache")


def check() -> None:
    """Raise InternalsMissing naming the first missing attribute."""
    headers = HTTPHeaders()
    for name in _HEADER_DICTS:
        _need(headers, name, "tornado.httputil.HTTPHeaders")
    left, right = socket.socketpair()
    try:
        stream = IOStream(left)
        _need(stream, "_write_buffer", "tornado.iostream.IOStream")
        if not isinstance(stream._write_buffer, Sized):
            raise InternalsMissing(_line("IOStream._write_buffer has no len()"))
        stream.close()
    finally:
        left.close()
        right.close()
    _need(WebSocketProtocol13(None, False, _WebSocketParams()), "_compressor",
          "tornado.websocket.WebSocketProtocol13")
    _need(WebSocketProtocol13, "_handle_message", "tornado.websocket.WebSocketProtocol13")
    _need(WebSocketProtocol13(None, False, _WebSocketParams()), "params",
          "tornado.websocket.WebSocketProtocol13")
    request = HTTPServerRequest(connection=_NoConnection(), headers=HTTPHeaders(Host="check"),
                                start_line=RequestStartLine("GET", "/", "HTTP/1.1"))
    handler = RequestHandler(Application(), request)
    for name in ("_headers", "ui"):
        _need(handler, name, "tornado.web.RequestHandler")
    loop = asyncio.new_event_loop()
    try:
        for name in ("_ready", "_selector"):
            if not hasattr(loop, name):
                raise InternalsMissing(
                    f"this Python's asyncio event loop ({type(loop).__name__}, Python "
                    f"{sys.version.split()[0]}) has no {name}, which notifier's fan-out reads")
    finally:
        loop.close()


class _NoConnection:
    """Enough of an HTTP connection to build a RequestHandler to look at."""

    def set_close_callback(self, callback: Any) -> None:
        pass


def _need(obj: Any, name: str, where: str) -> None:
    if not hasattr(obj, name):
        raise InternalsMissing(_line(f"{where}.{name} is missing"))


def _line(what: str) -> str:
    return (f"tornado {tornado.version}: {what}; notifier reads it on purpose "
            f"(see notifier/internals.py): install a tornado version setup.cfg allows")


def unsent_bytes(stream: IOStream) -> Sized:
    """What ``stream`` holds unsent, ours or Tornado's own frames (pings,
    pongs, close, possibly cut in the middle): ``len()`` of it is the byte
    count. Kept by the caller, so each later look is one ``len()``, not
    ``stream.writing()``'s two calls."""
    return stream._write_buffer


def is_compressed(ws_connection: Any) -> bool:
    """Did this connection negotiate permessage-deflate? Such a client
    cannot share pre-built frames."""
    return ws_connection._compressor is not None


def release_handshake(handler: Any) -> None:
    """Drop what a finished WebSocket handshake leaves on its handler:
    the request headers (emptied in place, since Tornado's get() frame
    keeps the object alive), the response headers (the emptied object
    stands in), and the template namespace, which Tornado's _break_cycles
    would drop at close but skips while a 101 connection is open. With
    many idle connections these are a good part of each one's memory."""
    headers = handler.request.headers
    for name in _HEADER_DICTS:
        getattr(headers, name).clear()
    handler._headers = headers
    handler.ui = None


class _TextAsBytes(WebSocketProtocol13):
    """Hands a text frame's payload to ``on_message`` as bytes, as it does a
    binary frame's. notifier's parser reads bytes directly and checks UTF-8
    itself, so a text frame that is not UTF-8 gets a ``bad_request`` like any
    other bad frame, where Tornado's own decode would drop the connection
    without a close frame; and no frame is decoded twice."""

    def _handle_message(self, opcode: int, data: bytes):
        return super()._handle_message(0x2 if opcode == 0x1 else opcode, data)


def text_as_bytes(protocol: WebSocketProtocol13 | None) -> WebSocketProtocol13 | None:
    """The same connection's protocol (what ``get_websocket_protocol`` made),
    handing text frames over as bytes (``_TextAsBytes``)."""
    if type(protocol) is not WebSocketProtocol13:
        return protocol
    return _TextAsBytes(protocol.handler, protocol.mask_outgoing, protocol.params)


def work_probe(loop: asyncio.AbstractEventLoop) -> Callable[[], bool]:
    """A function telling whether ``loop`` has something else to run: a
    ready callback, or a readable or writable socket. It peeks at asyncio's
    ready queue and selector (epoll is level-triggered, so looking loses no
    event). ``check()`` made sure a standard loop has both; another loop
    (uvloop) gets a probe that always says yes, so slices stay short."""
    ready = getattr(loop, "_ready", None)
    selector = getattr(loop, "_selector", None)
    if ready is None or selector is None:
        return _always
    select = selector.select

    def has_work() -> bool:
        return bool(ready) or bool(select(0))

    return has_work


def _always() -> bool:
    return True

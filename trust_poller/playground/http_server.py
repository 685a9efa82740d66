"""The loopback HTTP server both playground servers are built on.

One `ThreadingHTTPServer` on 127.0.0.1 (a free port) served from a background thread.
Replies are HTTP/1.1 with an exact Content-Length, so clients keep connections alive;
every request and every accepted connection is recorded for tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# A hook's reply: status, headers, body (Content-Length is added).
RawReply = tuple[int, dict[str, str], bytes]
# A test's one-off hook: (method, path as sent, body) -> a reply, or None to carry on.
Override = Callable[[str, str, bytes], RawReply | None]
_NO_BODY_STATUSES = frozenset({204, 304})
# set_outage modes: the server's JSON 503, a proxy's HTML 502, a TCP reset, no reply at all.
OUTAGE_MODES = ("503", "html502", "reset", "hang")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived; `path` is as sent (with any /api prefix and query)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    connection: int

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    def header(self, name: str) -> str | None:
        """The header's value, the name matched case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError when it is not JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(document).encode(),
    )


def html_page(status: int, title: str) -> Reply:
    """A reverse proxy's error page: not the server's JSON, so it proves nothing."""
    page = f"<html><head><title>{status} {title}</title></head><body><h1>{status} {title}</h1>"
    return Reply(status, {"Content-Type": "text/html"}, (page + "<hr>nginx</body></html>").encode())


class LoopbackServer:
    """Base of the playground servers: subclasses implement `respond`.

    Each request goes through `handle`: the `override` hook, then any outage, then `respond`.
    A `None` reply drops the connection without replying (a TCP reset). With `tls`, it
    serves HTTPS with that server context instead of plain HTTP.
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._open_connections: set[socket.socket] = set()
        self._requests: list[RecordedRequest] = []
        self._connections_opened = 0
        self._outage: tuple[str | None, tuple[str, ...] | None] = (None, None)
        self.override: Override | None = None

    def respond(self, request: RecordedRequest) -> Reply | None:
        raise NotImplementedError

    def handle(self, request: RecordedRequest) -> Reply | None:
        hook = self.override
        raw = None if hook is None else hook(request.method, request.path, request.body)
        if raw is not None:
            return Reply(*raw)
        outage = self._outage_for(request.path)
        if outage is not None:
            return self._outage_reply(outage, request.path)
        return self.respond(request)

    # --- fault injection -------------------------------------------------------------

    def set_outage(self, mode: str | None, paths: tuple[str, ...] | None = None) -> None:
        """None, "503", "html502", "reset" or "hang"; `paths` limits it to paths containing one.

        "hang" reads the request and then waits, without replying, until the outage ends
        or the server stops; the connection is then dropped.
        """
        if mode is not None and mode not in OUTAGE_MODES:
            raise ValueError(f"outage mode must be None or one of {OUTAGE_MODES}")
        with self._changed:
            self._outage = (mode, paths)
            self._changed.notify_all()

    def _outage_for(self, path: str) -> str | None:
        with self._lock:
            mode, paths = self._outage
        if mode is None or (paths is not None and not any(part in path for part in paths)):
            return None
        return mode

    def _outage_reply(self, mode: str, path: str) -> Reply | None:
        if mode == "503":
            return json_reply(503, {"detail": "Service unavailable"})
        if mode == "html502":
            return html_page(502, "Bad Gateway")
        if mode == "hang":
            with self._changed:
                self._changed.wait_for(
                    lambda: self._stopping.is_set() or self._outage_for(path) != "hang"
                )
        return None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError(f"{type(self).__name__} can be started once")
        self._server = _Server(self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"{type(self).__name__}:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; ends any hang or delay at once and closes kept-alive connections."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        server.shutdown()
        server.server_close()
        thread.join()
        with self._lock:
            connections = list(self._open_connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue
        self.wait_for(lambda: not self._open_connections, timeout=2.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    # --- recording -------------------------------------------------------------------

    @property
    def requests_log(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def connections_opened(self) -> int:
        """How many TCP connections were accepted (1 for a kept-alive client)."""
        with self._lock:
            return self._connections_opened

    def count(self, method: str, path_prefix: str) -> int:
        """How many requests with this method had a path (query excluded) starting so."""
        with self._lock:
            return sum(
                1
                for request in self._requests
                if request.method == method and request.route.startswith(path_prefix)
            )

    # --- helpers for subclasses and tests ----------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def pause(self, seconds: float) -> bool:
        """Sleep, cut short by stop(); True when the whole delay passed."""
        return not self._stopping.wait(seconds)

    # --- called by the handler threads -------------------------------------------------

    def _connection_opened(self, connection: socket.socket) -> int:
        with self._lock:
            self._connections_opened += 1
            self._open_connections.add(connection)
            return self._connections_opened

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._open_connections.discard(connection)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: LoopbackServer) -> None:
        self.owner = owner
        super().__init__((HOST, 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.owner.tls is None:
            return connection, address
        # The handshake happens on the handler thread's first read, so a client that
        # refuses our certificate never stalls the accepting thread.
        wrapped = self.owner.tls.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-request is normal here; keep test output clean.
        log.debug("loopback connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    connection_number = 0

    @property
    def owner(self) -> LoopbackServer:
        return cast(_Server, self.server).owner

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.owner._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                continue
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Bad Content-Length or chunk size")
            return
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=dict(self.headers.items()),
            body=body,
            at=time.monotonic(),
            connection=self.connection_number,
        )
        self.owner._record(request)
        try:
            reply = self.owner.handle(request)
        except Exception:
            log.exception("%s failed on %s %s", type(self.owner).__name__, self.command, self.path)
            reply = json_reply(500, {"detail": "Internal Server Error"})
        if reply is None:
            self._reset()
            return
        try:
            self._write(reply)
        except OSError:
            self.close_connection = True

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.status not in _NO_BODY_STATUSES:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.status not in _NO_BODY_STATUSES and reply.body:
            self.wfile.write(reply.body)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset, without a reply."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            return

"""What both HTTP servers of dra-core share: the agent's status endpoint and the admission
webhook listen on a chosen address, bound every client's time, connections and header bytes,
answer plain text or bytes, log quietly, and serve on a background thread.

The limits (:class:`HttpLimits`) are what keep a client, hostile or just stuck, from holding
the server's threads and memory:

* **time**: each phase the client controls (the TLS handshake, sending the request line and
  headers, including the wait for them on a fresh connection, sending the body, reading the
  answer) must end within ``timeout`` seconds, or the connection is shut down. The server's
  own work on a request (a liveness probe, a review) is not counted. The clock is a deadline,
  not a per-read timeout, so a client that sends one byte every few seconds is cut off too.
* **connections**: at most ``max_connections`` are served at once, one thread each. Further
  connections wait in the listen queue and are accepted in order as slots free up; one that
  waits ``timeout`` seconds in accept without a slot is refused (plain HTTP: ``503``).
* **headers**: at most ``max_header_bytes`` after the request line (``431`` beyond); the
  request line itself is capped at 64 KiB by :mod:`http.server` (``414``).

Bodies are the endpoint's business: :meth:`Handler.read_body` reads exactly Content-Length
bytes up to a limit (``413`` beyond, ``411`` without a length), and :class:`ByteBudget` bounds
the bytes being decoded at once. :func:`parse_json` refuses JSON that is not UTF-8, nested
deeper than :data:`MAX_JSON_DEPTH` or with a number longer than :data:`MAX_JSON_NUMBER_DIGITS`
digits, before :func:`json.loads` sees it, so none of them turns into a ``RecursionError`` or
an integer conversion error.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dra_core import strictjson
from dra_core.lazylog import logger
from dra_core.strictjson import JsonLimitError

__all__ = (
    "MAX_JSON_DEPTH",
    "MAX_JSON_NUMBER_DIGITS",
    "TEXT",
    "BackgroundServer",
    "ByteBudget",
    "ClientGone",
    "Handler",
    "HttpError",
    "HttpLimits",
    "JsonLimitError",
    "LimitedHTTPServer",
    "parse_json",
)

TEXT = "text/plain; charset=utf-8"

#: Nesting of arrays and objects allowed in a JSON body: Kubernetes objects stay far below.
MAX_JSON_DEPTH = 100
#: Digits (integer, fraction and exponent together) allowed in one JSON number; a Kubernetes
#: integer is an int64 of at most 19.
MAX_JSON_NUMBER_DIGITS = 100


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost a server (see the module documentation)."""

    #: Seconds for each phase the client controls (handshake, request, body, answer).
    timeout: float = 10.0
    #: Connections served at once (one thread each).
    max_connections: int = 16
    #: Bytes of headers after the request line.
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            msg = f"timeout must be positive, not {self.timeout}"
            raise ValueError(msg)
        if self.max_connections < 1 or self.max_header_bytes < 1:
            msg = "max_connections and max_header_bytes must be at least 1"
            raise ValueError(msg)


class HttpError(Exception):
    """A request the handler answers with ``status`` and ``message`` (a client error).

    ``declared`` is the body length the client announced, for a 413 (at most 2**62).
    """

    def __init__(self, status: int, message: str, *, declared: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.declared = declared


class ClientGone(Exception):
    """The client closed the connection or ran out of time before the request was complete."""


def parse_json(
    raw: bytes,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_number_digits: int = MAX_JSON_NUMBER_DIGITS,
) -> Any:
    """``raw`` decoded as strict JSON (RFC 8259), within the depth and number limits.

    The text must be UTF-8, as JSON exchanged between systems is (a leading byte order mark is
    ignored): the limits are checked on the bytes, which :func:`json.loads` would otherwise
    read as UTF-16 or UTF-32 when they look like it, past the checks.

    :raises JsonLimitError: not UTF-8, not JSON, too deep, a number too long or out of range
        (NaN and Infinity are refused too); the message says which.
    """
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    # JSON text never holds a NUL byte, and ASCII written as UTF-16 or UTF-32 is full of them.
    bad = raw.find(b"\x00")
    text = ""
    if bad < 0:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = exc.start
    if bad >= 0:
        msg = (
            f"the body is not JSON text in UTF-8 (byte {bad} is not valid there: UTF-16 or "
            "UTF-32?); send JSON encoded as UTF-8"
        )
        raise JsonLimitError(msg)
    try:
        strictjson.check_shape(raw, max_depth, max_number_digits)
        return strictjson.loads(text)
    except JsonLimitError:
        raise
    except RecursionError:
        msg = "the JSON is nested too deeply"
        raise JsonLimitError(msg) from None
    except ValueError as exc:  # JSONDecodeError
        msg = f"the body is not JSON: {exc}"
        raise JsonLimitError(msg) from None


class ByteBudget:
    """At most ``total`` bytes held at once by the requests that :meth:`hold` them.

    A request larger than the whole budget holds all of it (it runs alone).
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            msg = f"a byte budget must be at least 1, not {total}"
            raise ValueError(msg)
        self.total = total
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @contextlib.contextmanager
    def hold(self, size: int, timeout: float) -> Iterator[bool]:
        """Hold ``size`` bytes for the ``with`` block; yields False when none were free in time."""
        size = max(0, min(size, self.total))
        with self._cond:
            ok = self._cond.wait_for(lambda: self._used + size <= self.total, timeout)
            if ok:
                self._used += size
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._used -= size
                    self._cond.notify_all()


# ------------------------------------------------------------------ the server
_REFUSAL_BODY = b"too many connections, try again\n"
_REFUSAL = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
    + str(len(_REFUSAL_BODY)).encode()
    + b"\r\n\r\n"
    + _REFUSAL_BODY
)


def _address_family(host: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return infos[0][0]
    return socket.AF_INET6 if version == 6 else socket.AF_INET


class LimitedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server enforcing :class:`HttpLimits` (see the module documentation).

    Subclasses may override :meth:`wrap` to turn an accepted socket into the connection the
    handler reads (TLS) and set :attr:`refusal` to None when a plain-text 503 makes no sense.
    """

    daemon_threads = True
    #: Sent to a connection refused for lack of a slot (None: just close it).
    refusal: bytes | None = _REFUSAL

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        limits: HttpLimits,
        name: str = "http",
    ) -> None:
        self.limits = limits
        self.name = name
        host = server_address[0] or "0.0.0.0"
        self.address_family = _address_family(host)
        # Connections beyond max_connections wait here, in the kernel, without a thread.
        self.request_queue_size = 128
        self._cond = threading.Condition()
        self._active = 0
        self._closing = False
        self._deadlines: dict[socket.socket, float] = {}
        self._reaper: threading.Thread | None = None
        self._refused = 0
        self._refusal_logged = 0.0
        #: Connections cut at their deadline, and refused for lack of a slot (for tests).
        self.timed_out = 0
        self.refused = 0
        super().__init__((host, server_address[1]), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the address's host name (a DNS lookup).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    # ---------------------------------------------------------------- connection slots
    @property
    def active(self) -> int:
        """Connections being served now."""
        with self._cond:
            return self._active

    def _take_slot(self) -> bool:
        with self._cond:
            free = self._cond.wait_for(
                lambda: self._closing or self._active < self.limits.max_connections,
                self.limits.timeout,
            )
            if not free or self._closing:
                return False
            self._active += 1
            return True

    def _give_slot(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take_slot():
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give_slot()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_slot()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        now = time.monotonic()
        with self._cond:
            self.refused += 1
            self._refused += 1
            report = now - self._refusal_logged >= 60
            if report:
                count, self._refused, self._refusal_logged = self._refused, 0, now
        if report:
            logger.warning(
                "{}: refused {} connection(s) (latest from {}): all {} connection slots busy "
                "for {} s",
                self.name,
                count,
                client_address[0] if client_address else "?",
                self.limits.max_connections,
                self.limits.timeout,
            )
        with contextlib.suppress(OSError):
            request.setblocking(False)
            if self.refusal is not None:
                request.send(self.refusal)  # fits the send buffer: never blocks the loop
        _drop_pending(request)
        self.shutdown_request(request)

    # ---------------------------------------------------------------- deadlines
    def arm(self, conn: socket.socket, seconds: float | None = None) -> None:
        """Shut ``conn`` down unless the client is done within ``seconds`` (default timeout)."""
        deadline = time.monotonic() + (self.limits.timeout if seconds is None else seconds)
        with self._cond:
            self._deadlines[conn] = deadline
            self._cond.notify_all()

    def disarm(self, conn: socket.socket) -> None:
        """The server is working on ``conn``'s request: no deadline until the next :meth:`arm`."""
        with self._cond:
            self._deadlines.pop(conn, None)

    def _reap(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                expired = [c for c, d in self._deadlines.items() if self._closing or d <= now]
                for conn in expired:
                    del self._deadlines[conn]
                    if not self._closing:  # counted first: the client sees the cut at once
                        self.timed_out += 1
                    # The socket's own shutdown, not SSLSocket.shutdown (which would drop the
                    # TLS layer under the handler). Done under the lock that disarm() and
                    # finish_request() take, so conn cannot be closed and its descriptor reused
                    # meanwhile.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(conn, socket.SHUT_RDWR)
                if self._closing:
                    return
                soonest = min(self._deadlines.values(), default=None)
                self._cond.wait(None if soonest is None else max(0.0, soonest - now) + 0.01)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        with self._cond:
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name=f"{self.name}-deadlines", daemon=True
                )
                self._reaper.start()
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop accepting; connections still waiting for their client are cut at once."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        super().shutdown()

    def server_close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        super().server_close()

    # ---------------------------------------------------------------- one connection
    def wrap(self, request: socket.socket) -> socket.socket:
        """The connection the handler reads for ``request``, without I/O (plain HTTP: itself)."""
        return request

    def open_connection(self, conn: socket.socket) -> None:
        """The I/O a connection needs before its first request (TLS: the handshake), under the
        client's deadline."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        # A backstop for each read and write; the deadline (arm) is the rule.
        request.settimeout(2 * self.limits.timeout)
        self.arm(request)
        conn = request
        try:
            conn = self.wrap(request)
            if conn is not request:  # the deadline follows the socket that owns the descriptor
                with self._cond:
                    deadline = self._deadlines.pop(request, time.monotonic())
                    self._deadlines[conn] = deadline
            self.open_connection(conn)
            super().finish_request(conn, client_address)
        finally:
            with self._cond:
                self._deadlines.pop(conn, None)
                self._deadlines.pop(request, None)
            _drop_pending(conn)
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.opt(exception=True).debug("{}: connection from {} failed", self.name, client_address)


def _drop_pending(conn: socket.socket) -> None:
    """Read and drop what the client already sent and nobody read (at most 1 MiB, without
    waiting): closing a socket with unread data resets the connection, and the client could
    lose the answer it was sent (a 431 for too many header bytes, say)."""
    with contextlib.suppress(OSError, ValueError):
        conn.setblocking(False)
        for _ in range(16):
            if not conn.recv(65536):
                return


class _HeaderBudget:
    """The handler's ``rfile``: header lines beyond ``budget`` bytes are refused (431)."""

    def __init__(self, raw: Any, budget: int) -> None:
        self._raw = raw
        self._budget = budget
        self._left = budget
        self._first = True

    def reset(self) -> None:
        self._left = self._budget
        self._first = True

    def readline(self, size: int = -1) -> bytes:
        if self._first:  # the request line: http.server caps it (414)
            self._first = False
            line: bytes = self._raw.readline(size)
            return line
        cap = self._left + 1 if size < 0 else min(size, self._left + 1)
        line = self._raw.readline(cap)
        self._left -= len(line)
        if self._left < 0:
            msg = f"request headers over {self._budget} bytes"
            raise http.client.LineTooLong(msg)
        return line

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._raw.read(size)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class Handler(BaseHTTPRequestHandler):
    """A request handler with the plain answers every endpoint gives, under the limits of its
    :class:`LimitedHTTPServer`.

    A ``do_*`` method calls :meth:`received` (or :meth:`read_body`, which does) once the request
    is in, so the time it then takes is not charged to the client.
    """

    server: LimitedHTTPServer
    rfile: Any
    # Errors http.server finds itself (a request line it cannot parse, headers over the
    # limit) are answered with a status line, whatever the client sent (not as HTTP/0.9, a
    # bare body), and in plain text like every other answer (not an HTML page).
    default_request_version = "HTTP/1.0"
    error_content_type = TEXT
    error_message_format = "%(message)s: %(explain)s\n"

    def setup(self) -> None:
        super().setup()  # the socket's timeout was set by the server
        self.rfile = _HeaderBudget(self.rfile, self.server.limits.max_header_bytes)

    def handle_one_request(self) -> None:
        self.server.arm(self.connection)
        self.rfile.reset()
        super().handle_one_request()

    def received(self) -> None:
        """The whole request is in: stop the client's clock until the answer is written."""
        self.server.disarm(self.connection)

    def content_length(self, max_bytes: int) -> int:
        """The request's Content-Length, at most ``max_bytes``.

        :raises HttpError: 411 without one (or chunked), 400 when malformed, 413 when larger.
        """
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "a Content-Length header is required (no Transfer-Encoding)")
        value = self.headers.get("Content-Length")
        if value is None:
            raise HttpError(411, "a Content-Length header is required")
        value = value.strip(" \t")
        if not (value.isascii() and value.isdigit()):  # not "²" nor other Unicode digits
            raise HttpError(
                400, f"bad Content-Length {value[:40]!r}: give the body's size in bytes"
            )
        digits = value.lstrip("0") or "0"
        length = int(digits) if len(digits) <= 18 else 2**62
        if length > max_bytes:
            size = f"{length} bytes" if len(digits) <= 18 else f"a number of {len(digits)} digits"
            msg = f"the request body is {size}, over the limit of {max_bytes} bytes"
            raise HttpError(413, msg, declared=length)
        return length

    def read_body(self, length: int) -> bytes:
        """Exactly ``length`` bytes of body (within the client's deadline), then :meth:`received`.

        :raises ClientGone: the client closed the connection or ran out of time.
        """
        try:
            data: bytes = self.rfile.read(length) if length else b""
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        if len(data) < length:
            msg = f"got {len(data)} of {length} body bytes"
            raise ClientGone(msg)
        self.received()
        return data

    def refuse_body(self, status: int, text: str, declared: int) -> None:
        """Answer ``status`` without reading the body, then read and drop what the client still
        sends (at most 16 MiB within 2 s) so that it gets the answer rather than a reset."""
        self.send_text(status, text)
        self.wfile.flush()
        self.close_connection = True
        self.server.arm(self.connection, min(2.0, self.server.limits.timeout))
        left = min(declared, 16 * 1024 * 1024)
        with contextlib.suppress(OSError, ValueError):
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    def send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.server.arm(self.connection)  # the client must take the answer in time
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_text(self, status: int, text: str) -> None:
        self.send_body(status, TEXT, f"{text}\n".encode())

    def log_message(self, format: str, *args: object) -> None:
        logger.trace("http: {}", format % args)


class BackgroundServer:
    """Runs ``server`` on a daemon thread until :meth:`stop`."""

    def __init__(self, server: ThreadingHTTPServer, name: str) -> None:
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def server(self) -> ThreadingHTTPServer:
        return self._server

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

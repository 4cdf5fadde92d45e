"""A gRPC server for the kubelet's Unix sockets: HTTP/2 from the h2 library, and threads.

The kubelet calls a DRA plugin with unary calls (registration, prepare, unprepare) and one
server stream (device health), one HTTP/2 connection per socket. This server answers them
with plain threads: one blocked in ``accept`` per socket, one blocked in ``recv`` per
connection, and a pool of workers running the calls. An idle plugin therefore runs no code
at all, and the agent needs no gRPC runtime to answer the kubelet: grpcio's server polls its
completion queue every 200 ms and keeps gRPC core's own threads awake, which made an idle
agent cost twenty times the CPU of a Go one.

Services are added from their protobuf descriptors (``add_service``), so the generated
``*_pb2_grpc`` modules (and grpcio) are not needed. A servicer's method receives the decoded
request and a `CallContext`; a unary method returns the response, a streaming one yields its
responses. An exception becomes status UNKNOWN with its text, logged with its traceback.

What the server enforces: requests are ``POST`` with a gRPC content type to a known method
(else UNIMPLEMENTED, as gRPC answers), one uncompressed message of at most
`MAX_MESSAGE_BYTES` (else INTERNAL, UNIMPLEMENTED or RESOURCE_EXHAUSTED); a call whose
deadline passes or whose stream is reset while it waits for a worker is not run. Headers are
checked for what the server uses of them, not against every rule of HTTP/2: h2's own header
validation, which an HTTP proxy needs, is off; it cost a sixth of the work of a call, and the
peer is the kubelet, on a socket only root reaches.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from dra_core.kubelet.grpcwire import (
    CONTENT_TYPE,
    MAX_MESSAGE_BYTES,
    RpcError,
    Status,
    encode_status_message,
    frame_message,
    parse_timeout,
    split_messages,
)
from dra_core.lazylog import logger

__all__ = ["CallContext", "GrpcServer", "GrpcServerError"]

#: Streams one connection may have open at once: the kubelet sends every prepare and unprepare
#: of the node over one connection, and a stream beyond the limit waits in the client.
MAX_CONCURRENT_STREAMS: Final = 1024
_RECV_BYTES: Final = 256 * 1024
_LISTEN_BACKLOG: Final = 64
_HEADERS_OK: Final = [(b":status", b"200"), (b"content-type", CONTENT_TYPE)]
_LAST_STREAM_ID: Final = 2**31 - 1
#: How long stop() waits for calls to notice their end, and for each thread.
_CALL_END_SECONDS: Final = 2.0


class GrpcServerError(RuntimeError):
    """The server was used wrongly: a method missing from a servicer, a double start."""


class CallContext:
    """What a servicer method knows of its call: the deadline and whether the caller is
    still there."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline
        self._lock = threading.Lock()
        self._ended = False
        self._callbacks: list[Callable[[], object]] = []

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (None: the caller set none)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the caller cancelled, the deadline passed or the server stopped."""
        return not self._ended and self.time_remaining() != 0.0

    def add_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once the call ends (cancelled, connection gone, server
        stopping); at once if it has ended."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return
        callback()

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass(frozen=True)
class _Method:
    path: str
    request_type: type[Message]
    handler: Callable[[Any, CallContext], Any]
    streaming: bool


@dataclass
class _Call:
    method: _Method | None
    context: CallContext
    body: bytearray = field(default_factory=bytearray)
    headers_sent: bool = False


class _Connection:
    """One client connection: reads in its own thread, answers from the workers."""

    def __init__(self, sock: socket.socket, server: GrpcServer) -> None:
        self._sock = sock
        self._server = server
        # No header validation by h2 (see the module's docstring): `_on_request` checks what
        # the server uses, and this server writes its own headers.
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = H2Connection(config=config)
        self._h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        # Guards the h2 state machine and the socket's writes; senders waiting for the
        # peer's flow-control window wait on it.
        self._cond = threading.Condition()
        self._calls: dict[int, _Call] = {}
        self._closed = False

    def serve(self) -> None:
        try:
            with self._cond:
                self._h2.initiate_connection()
                self._flush()
            while not self._closed:
                data = self._sock.recv(_RECV_BYTES)
                if not data:
                    break
                with self._cond:
                    ready = self._receive(data)
                for stream_id, call in ready:
                    self._server.dispatch(self, stream_id, call)
        except H2Error as exc:  # the client broke HTTP/2: h2 queued a GOAWAY saying how
            logger.warning("closing a kubelet socket connection that broke HTTP/2: {}", exc)
            with self._cond, contextlib.suppress(OSError):
                self._flush()
        except OSError as exc:
            if not self._closed:
                logger.debug("gRPC connection closed: {}", exc)
        finally:
            self.close()

    def _receive(self, data: bytes) -> list[tuple[int, _Call]]:
        """Feed ``data`` to h2; return the calls whose request is complete."""
        ready: list[tuple[int, _Call]] = []
        for event in self._h2.receive_data(data):
            ready.extend(self._on_event(event))
        self._flush()
        return ready

    def _on_event(self, event: Event) -> Iterable[tuple[int, _Call]]:
        if isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.body += event.data
                if len(call.body) > MAX_MESSAGE_BYTES + 5:
                    text = f"the request is larger than {MAX_MESSAGE_BYTES} bytes"
                    self._refuse(event.stream_id, call, Status.RESOURCE_EXHAUSTED, text)
                    self._h2.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)  # stop sending
        elif isinstance(event, StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                return [(event.stream_id, call)]
        elif isinstance(event, StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.context.end()
            self._cond.notify_all()
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            self._cond.notify_all()
        return ()

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        headers = dict(event.headers or ())
        deadline: float | None = None
        problem: tuple[Status, str] | None = None
        if b"grpc-timeout" in headers:
            try:
                deadline = time.monotonic() + parse_timeout(headers[b"grpc-timeout"])
            except ValueError as exc:
                problem = (Status.INVALID_ARGUMENT, str(exc))
        path = bytes(headers.get(b":path", b"")).decode("utf-8", errors="replace")
        method = self._server.method(path)
        call = _Call(method=method, context=CallContext(deadline))
        self._calls[stream_id] = call
        if headers.get(b":method") != b"POST":
            problem = (Status.UNIMPLEMENTED, "gRPC calls are POST requests")
        elif not bytes(headers.get(b"content-type", b"")).startswith(CONTENT_TYPE):
            problem = (Status.UNIMPLEMENTED, "the content type is not application/grpc")
        elif method is None:
            problem = (Status.UNIMPLEMENTED, f"unknown method {path}")
        if problem is not None:
            self._refuse(stream_id, call, *problem)

    def _refuse(self, stream_id: int, call: _Call, status: Status, text: str) -> None:
        """Answer a call with an error before it runs; its further data is ignored."""
        call.context.end()
        self._send_trailers(stream_id, call, status, text)
        self._calls.pop(stream_id, None)

    def run(self, stream_id: int, call: _Call) -> None:
        """Run a complete call: decode, call the servicer, answer. In a worker thread."""
        method = call.method
        assert method is not None
        try:
            if not call.context.is_active():
                self._finish(stream_id, call, Status.DEADLINE_EXCEEDED, "the deadline passed")
                return
            try:
                messages = split_messages(call.body)
                if len(messages) != 1:
                    text = f"{len(messages)} request messages; {method.path} takes one"
                    raise RpcError(Status.INTERNAL, text)
                request = method.request_type.FromString(messages[0])
            except DecodeError as exc:
                text = f"cannot decode the request as {method.request_type.DESCRIPTOR.full_name}"
                self._finish(stream_id, call, Status.INTERNAL, f"{text}: {exc}")
                return
            except RpcError as exc:
                self._finish(stream_id, call, exc.status, exc.details)
                return
            try:
                if method.streaming:
                    for response in method.handler(request, call.context):
                        if not self._send_message(stream_id, call, response):
                            return  # the caller left
                    self._finish(stream_id, call, Status.OK, "")
                else:
                    response = method.handler(request, call.context)
                    self._send_message(stream_id, call, response, end=True)
            except Exception as exc:  # noqa: BLE001 - a servicer bug fails this call only
                logger.opt(exception=exc).error("gRPC method {} raised: {}", method.path, exc)
                self._finish(stream_id, call, Status.UNKNOWN, f"{type(exc).__name__}: {exc}")
        finally:
            call.context.end()
            with self._cond:
                self._calls.pop(stream_id, None)

    def refuse_unavailable(self, stream_id: int, call: _Call) -> None:
        with self._cond:
            self._refuse(stream_id, call, Status.UNAVAILABLE, "the server is stopping")
            self._flush()

    def _send_message(
        self, stream_id: int, call: _Call, message: Any, *, end: bool = False
    ) -> bool:
        """Send one response message (and with ``end`` the OK trailers); False if the stream
        or the connection is gone."""
        payload = frame_message(message.SerializeToString())
        with self._cond:
            try:
                if not call.headers_sent:
                    self._h2.send_headers(stream_id, _HEADERS_OK)
                    call.headers_sent = True
                self._send_data(stream_id, payload)
                if end:
                    self._h2.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
                self._flush()
            except (H2Error, OSError):  # StreamClosedError is an H2Error
                return False
            return True

    def _send_data(self, stream_id: int, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            size = min(self._h2.local_flow_control_window(stream_id), len(view))
            size = min(size, self._h2.max_outbound_frame_size)
            if size <= 0:  # wait for the peer's window update (or the stream's end)
                self._flush()
                if self._closed:
                    raise StreamClosedError(stream_id)
                self._cond.wait()
                continue
            self._h2.send_data(stream_id, view[:size])
            view = view[size:]

    def _finish(self, stream_id: int, call: _Call, status: Status, text: str) -> None:
        with self._cond:
            try:
                self._send_trailers(stream_id, call, status, text)
                self._flush()
            except (H2Error, OSError):  # StreamClosedError is an H2Error
                pass  # the caller left; nothing to answer

    def _send_trailers(self, stream_id: int, call: _Call, status: Status, text: str) -> None:
        trailers = [(b"grpc-status", str(int(status)).encode())]
        if text:
            trailers.append((b"grpc-message", encode_status_message(text)))
        if not call.headers_sent:  # a trailers-only answer
            trailers = [*_HEADERS_OK, *trailers]
            call.headers_sent = True
        with contextlib.suppress(StreamClosedError):
            self._h2.send_headers(stream_id, trailers, end_stream=True)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._closed:
            self._sock.sendall(data)

    def goaway(self) -> None:
        """Tell the client to open no new stream here; end the streaming calls (they never end
        on their own) and let the unary calls in flight go on."""
        # The GOAWAY of a graceful shutdown (last stream 2^31-1: nothing in flight refused),
        # written past h2, whose own GOAWAY would close the connection for the calls in flight.
        frame = GoAwayFrame(0)
        frame.last_stream_id = _LAST_STREAM_ID
        with self._cond:
            streams = [c for c in self._calls.values() if c.method and c.method.streaming]
            with contextlib.suppress(OSError):
                self._flush()
                if not self._closed:
                    self._sock.sendall(frame.serialize())
        for call in streams:
            call.context.end()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            calls = list(self._calls.values())
            self._calls.clear()
            self._cond.notify_all()
        for call in calls:
            call.context.end()
        with contextlib.suppress(OSError):  # already disconnected
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._server.forget(self)


class GrpcServer:
    """Serves gRPC services on Unix sockets; see the module docstring.

    ``workers`` bounds the calls running at once (more wait for a worker); with None every
    call runs on its connection's reading thread, one after the other, which suits services
    whose calls return at once (registration).
    """

    def __init__(self, name: str, *, workers: int | None) -> None:
        self._name = name
        self._methods: dict[str, _Method] = {}
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._listeners: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running_calls = 0
        self._stopping = False
        self._started = False

    def add_service(self, service: ServiceDescriptor, servicer: object) -> None:
        """Serve every method of ``service`` with the same-named method of ``servicer``."""
        for method in service.methods:
            handler = getattr(servicer, method.name, None)
            if not callable(handler):
                msg = (
                    f"{type(servicer).__name__} has no method {method.name} of service "
                    f"{service.full_name}; add it or serve another servicer"
                )
                raise GrpcServerError(msg)
            if method.client_streaming:
                msg = f"{service.full_name}.{method.name} streams requests, which is not served"
                raise GrpcServerError(msg)
            path = f"/{service.full_name}/{method.name}"
            self._methods[path] = _Method(
                path=path,
                request_type=GetMessageClass(method.input_type),
                handler=handler,
                streaming=method.server_streaming,
            )

    def method(self, path: str) -> _Method | None:
        return self._methods.get(path)

    def listen(self, path: Path) -> None:
        """Bind and listen on the Unix socket ``path`` (served once started). Raises OSError."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen(_LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        self._listeners.append(listener)

    def start(self) -> None:
        with self._lock:
            if self._started:
                msg = f"the {self._name} gRPC server is already started"
                raise GrpcServerError(msg)
            self._started = True
            if self._workers is not None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix=f"{self._name}-grpc"
                )
        for listener in self._listeners:
            self._spawn(f"{self._name}-accept", self._accept, listener)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the listener was shut down by stop()
            connection = _Connection(sock, self)
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._connections.add(connection)
            self._spawn(f"{self._name}-conn", connection.serve)

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def dispatch(self, connection: _Connection, stream_id: int, call: _Call) -> None:
        with self._lock:
            accepted = not self._stopping
            if accepted:
                self._running_calls += 1
        if not accepted:
            connection.refuse_unavailable(stream_id, call)
        elif self._executor is None:
            self._run(connection, stream_id, call)
        else:
            try:
                self._executor.submit(self._run, connection, stream_id, call)
            except RuntimeError:  # the pool shut down since the check above
                self._call_done()
                connection.refuse_unavailable(stream_id, call)

    def _run(self, connection: _Connection, stream_id: int, call: _Call) -> None:
        try:
            connection.run(stream_id, call)
        finally:
            self._call_done()

    def _call_done(self) -> None:
        with self._lock:
            self._running_calls -= 1
            self._idle.notify_all()

    def stop(self, grace: float | None = None) -> None:
        """Stop listening and end the streams at once; let unary calls in flight finish for
        ``grace`` seconds (None: none); then end every call and connection."""
        with self._lock:
            self._stopping = True
            listeners, self._listeners = self._listeners, []
            connections = list(self._connections)
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes its accept()
            listener.close()
        for connection in connections:
            connection.goaway()
        if grace:
            self._wait_idle(grace)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        self._wait_idle(_CALL_END_SECONDS)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=_CALL_END_SECONDS)

    def _wait_idle(self, seconds: float) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._running_calls == 0, timeout=seconds)

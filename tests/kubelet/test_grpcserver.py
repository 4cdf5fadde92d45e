"""The kubelet sockets' gRPC server and client against grpcio, another gRPC implementation
(the kubelet's own Go clients talk to it in test_go_peer.py and on the real node)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import Frame, GoAwayFrame

from dra_core.kubelet.grpcclient import unary_call
from dra_core.kubelet.grpcserver import CallContext, GrpcServer, GrpcServerError
from dra_core.kubelet.grpcwire import (
    RpcError,
    Status,
    decode_status_message,
    encode_status_message,
    encode_timeout,
    frame_message,
    parse_timeout,
    split_messages,
)
from dra_core.kubelet.proto import (
    health_v1_pb2,
    pluginregistration_pb2,
    pluginregistration_pb2_grpc,
)

REGISTRATION = pluginregistration_pb2.DESCRIPTOR.services_by_name["Registration"]
HEALTH = health_v1_pb2.DESCRIPTOR.services_by_name["DRAResourceHealth"]
GET_INFO = "/pluginregistration.Registration/GetInfo"
NOTIFY = "/pluginregistration.Registration/NotifyRegistrationStatus"
WATCH = "/v1.DRAResourceHealth/NodeWatchResources"


class Registration:
    """GetInfo answers ``name``; NotifyRegistrationStatus runs ``notify`` (a test's hook)."""

    def __init__(
        self, name: str = "x", notify: Callable[[Any, CallContext], object] | None = None
    ) -> None:
        self.name = name
        self.notify = notify
        self.calls = 0

    def GetInfo(self, request: Any, context: CallContext) -> pluginregistration_pb2.PluginInfo:
        self.calls += 1
        return pluginregistration_pb2.PluginInfo(type="DRAPlugin", name=self.name)

    def NotifyRegistrationStatus(
        self, request: Any, context: CallContext
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        self.calls += 1
        if self.notify is not None:
            self.notify(request, context)
        return pluginregistration_pb2.RegistrationStatusResponse()


class Health:
    """Streams one message, then waits for the call's end and records it."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def NodeWatchResources(self, request: Any, context: CallContext) -> Iterator[Any]:
        context.add_callback(self.ended.set)
        yield health_v1_pb2.NodeWatchResourcesResponse()
        self.ended.wait(30)


def raising(exc: Exception) -> Callable[[Any, CallContext], None]:
    """A NotifyRegistrationStatus hook that raises ``exc``."""

    def notify(request: Any, context: CallContext) -> None:
        raise exc

    return notify


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[GrpcServer, Path]]]:
    servers: list[GrpcServer] = []

    def start(*services: tuple[Any, object], workers: int | None = 4) -> tuple[GrpcServer, Path]:
        server = GrpcServer("test", workers=workers)
        for descriptor, servicer in services:
            server.add_service(descriptor, servicer)
        path = tmp_path / f"s{len(servers)}.sock"
        server.listen(path)
        server.start()
        servers.append(server)
        return server, path

    yield start
    for server in servers:
        server.stop(None)


def raw_call(path: Path, method: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """A grpcio call sending ``payload`` as the request's bytes."""
    with grpc.insecure_channel(f"unix://{path}") as channel:
        call: Any = channel.unary_unary(method)
        answer: bytes = call(payload, timeout=timeout)
        return answer


def watch_health(channel: grpc.Channel) -> Any:
    """A v1 device health stream opened on ``channel``, by grpcio."""
    return channel.unary_stream(
        WATCH,
        request_serializer=health_v1_pb2.NodeWatchResourcesRequest.SerializeToString,
        response_deserializer=health_v1_pb2.NodeWatchResourcesResponse.FromString,
    )(health_v1_pb2.NodeWatchResourcesRequest())


def get_info(path: Path, timeout: float = 5.0) -> pluginregistration_pb2.PluginInfo:
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        info: pluginregistration_pb2.PluginInfo = stub.GetInfo(
            pluginregistration_pb2.InfoRequest(), timeout=timeout
        )
        return info


def test_unary_call_answered(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    _, path = serve((REGISTRATION, Registration("gpu.example.com")))
    assert get_info(path).name == "gpu.example.com"


@pytest.mark.parametrize("workers", [None, 4])
def test_many_calls_at_once_on_one_connection(
    serve: Callable[..., tuple[GrpcServer, Path]], workers: int | None
) -> None:
    servicer = Registration()
    _, path = serve((REGISTRATION, servicer), workers=workers)
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        futures = [stub.GetInfo.future(pluginregistration_pb2.InfoRequest()) for _ in range(300)]
        assert {f.result(timeout=30).name for f in futures} == {"x"}
    assert servicer.calls == 300


def test_unknown_method_is_unimplemented(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    _, path = serve((REGISTRATION, Registration()))
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(path, "/pluginregistration.Registration/Nope", b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "unknown method /pluginregistration.Registration/Nope" in str(raised.value.details())
    assert get_info(path).name == "x"  # the connection and the server go on


def test_undecodable_request_is_internal(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    servicer = Registration()
    _, path = serve((REGISTRATION, servicer))
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(path, GET_INFO, b"\xff\xff\xff")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    details = str(raised.value.details())
    assert "cannot decode the request as pluginregistration.InfoRequest" in details
    assert servicer.calls == 0


def test_oversized_request_is_refused(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    servicer = Registration()
    _, path = serve((REGISTRATION, servicer))
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(path, GET_INFO, b"\0" * (5 * 1024 * 1024))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 0
    assert get_info(path).name == "x"


def test_servicer_exception_fails_that_call_only(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    _, path = serve(
        (REGISTRATION, Registration(notify=raising(ValueError("the status went missing"))))
    )
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.NotifyRegistrationStatus(pluginregistration_pb2.RegistrationStatus(), timeout=5)
        assert stub.GetInfo(pluginregistration_pb2.InfoRequest(), timeout=5).name == "x"
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert raised.value.details() == "ValueError: the status went missing"


def test_large_response_crosses_flow_control_windows(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    """A 3 MiB answer: many times HTTP/2's initial window of 64 KiB."""
    _, path = serve((REGISTRATION, Registration(name="n" * (3 * 1024 * 1024))))
    assert len(get_info(path, timeout=20).name) == 3 * 1024 * 1024


def test_non_ascii_status_message_round_trips(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    broken = raising(RuntimeError("Gerät 100% kaputt\nzweite Zeile"))
    _, path = serve((REGISTRATION, Registration(notify=broken)))
    with pytest.raises(RpcError) as raised:
        unary_call(
            path,
            REGISTRATION.methods_by_name["NotifyRegistrationStatus"],
            pluginregistration_pb2.RegistrationStatus(),
            timeout=5,
        )
    assert raised.value.status == Status.UNKNOWN
    assert raised.value.details == "RuntimeError: Gerät 100% kaputt\nzweite Zeile"
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        with pytest.raises(grpc.RpcError) as by_grpcio:
            stub.NotifyRegistrationStatus(pluginregistration_pb2.RegistrationStatus(), timeout=5)
    assert by_grpcio.value.details() == "RuntimeError: Gerät 100% kaputt\nzweite Zeile"


def test_a_call_whose_deadline_passes_in_the_queue_is_not_run(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    release = threading.Event()
    ran: list[bool] = []

    def slow(request: Any, context: CallContext) -> None:
        ran.append(request.plugin_registered)
        if request.plugin_registered:
            release.wait(10)

    _, path = serve((REGISTRATION, Registration(notify=slow)), workers=1)
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        first = stub.NotifyRegistrationStatus.future(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=True), timeout=10
        )
        deadline = time.monotonic() + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = stub.NotifyRegistrationStatus.future(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=False), timeout=0.3
        )
        with pytest.raises(grpc.RpcError) as raised:
            queued.result()
        release.set()
        first.result()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)  # the worker is free: the queued call would have run by now
    assert ran == [True]


def test_the_deadline_reaches_the_servicer(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    seen: list[float | None] = []
    _, path = serve(
        (REGISTRATION, Registration(notify=lambda r, c: seen.append(c.time_remaining())))
    )
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        stub.NotifyRegistrationStatus(pluginregistration_pb2.RegistrationStatus(), timeout=7)
        stub.NotifyRegistrationStatus(pluginregistration_pb2.RegistrationStatus())
    remaining, unlimited = seen
    assert remaining is not None and 6 < remaining <= 7
    assert unlimited is None


def test_a_cancelled_stream_ends_its_call(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    health = Health()
    _, path = serve((HEALTH, health))
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stream = watch_health(channel)
        next(stream)
        assert not health.ended.is_set()
        stream.cancel()
        assert health.ended.wait(5)


def test_stop_ends_streams_and_lets_unary_calls_finish(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(request: Any, context: CallContext) -> None:
        started.set()
        release.wait(10)

    health = Health()
    server, path = serve((REGISTRATION, Registration(notify=slow)), (HEALTH, health))
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        stream = watch_health(channel)
        next(stream)
        pending = stub.NotifyRegistrationStatus.future(
            pluginregistration_pb2.RegistrationStatus(), timeout=10
        )
        assert started.wait(5)
        with ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(server.stop, 10.0)
            assert health.ended.wait(5), "the stream did not end at once"
            assert not stopping.done()
            release.set()
            pending.result(timeout=5)  # answered within the grace period
            stopping.result(timeout=5)
    assert not path.exists() or _refused(path)


def test_a_client_breaking_http2_gets_a_goaway_and_the_server_goes_on(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    _, path = serve((REGISTRATION, Registration()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        # The client preface, then a DATA frame on stream 0, which HTTP/2 forbids.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\0\0\0\0\0\0\0\0\0\0")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    frames = []
    while len(received) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(received[:9]))
        frame.parse_body(memoryview(received[9 : 9 + length]))
        frames.append(frame)
        received = received[9 + length :]
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert get_info(path).name == "x"


def _h2_call(path: Path, headers: list[tuple[bytes, bytes]], body: bytes) -> dict[bytes, bytes]:
    """One request with exactly ``headers`` (h2 told not to check or fix them), by a client
    of its own; the response's headers and trailers (the grpc-status) and its data."""
    client = H2Connection(
        H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    client.initiate_connection()
    client.send_headers(1, headers)
    client.send_data(1, body, end_stream=True)
    answer: dict[bytes, bytes] = {b"data": b""}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(client.data_to_send())
        ended = False
        while not ended and (chunk := sock.recv(65536)):
            for event in client.receive_data(chunk):
                if isinstance(event, ResponseReceived | TrailersReceived):
                    answer.update(event.headers)
                elif isinstance(event, DataReceived):
                    answer[b"data"] += event.data
                ended = ended or isinstance(event, StreamEnded | StreamReset)
            sock.sendall(client.data_to_send())
    return answer


def test_headers_http2_frowns_on_do_not_matter_and_those_the_server_uses_are_checked(
    serve: Callable[..., tuple[GrpcServer, Path]],
) -> None:
    """The server reads what it needs of a request's headers (h2 does not validate them)."""
    _, path = serve((REGISTRATION, Registration()))
    request = frame_message(pluginregistration_pb2.InfoRequest().SerializeToString())
    grpc_headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", GET_INFO.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
    ]
    # A connection-specific header and an upper-case name: against HTTP/2's rules, harmless.
    odd = [*grpc_headers, (b"connection", b"keep-alive"), (b"X-Odd", b"1")]
    answer = _h2_call(path, odd, request)
    assert answer[b"grpc-status"] == b"0"
    (message,) = split_messages(answer[b"data"])
    assert pluginregistration_pb2.PluginInfo.FromString(message).name == "x"

    without_path = [h for h in grpc_headers if h[0] != b":path"]
    answer = _h2_call(path, without_path, request)
    assert answer[b"grpc-status"] == str(Status.UNIMPLEMENTED.value).encode()
    assert answer[b"grpc-message"].startswith(b"unknown method")

    as_get = [(b":method", b"GET"), *grpc_headers[1:]]
    answer = _h2_call(path, as_get, request)
    assert answer[b"grpc-status"] == str(Status.UNIMPLEMENTED.value).encode()
    assert get_info(path).name == "x"


def _refused(path: Path) -> bool:
    try:
        get_info(path, timeout=1)
    except grpc.RpcError:
        return True
    return False


def test_an_idle_server_runs_no_code(serve: Callable[..., tuple[GrpcServer, Path]]) -> None:
    """The accepting and connection threads block in the kernel: no CPU at all at rest."""
    _, path = serve((REGISTRATION, Registration()))
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
        stub.GetInfo(pluginregistration_pb2.InfoRequest(), timeout=5)  # a connection is open
        threads = [t for t in threading.enumerate() if t.name.startswith("test-")]
        assert {t.name for t in threads} >= {"test-accept", "test-conn"}
        # A thread that polls (grpcio's server wakes every 200 ms) never has a quiet second;
        # a few tries let the client's last frames (pings, window updates) be answered first.
        quiet = False
        for _ in range(5):
            before = {t.native_id: _cpu_ns(t.native_id) for t in threads}
            time.sleep(1.0)
            after = {t.native_id: _cpu_ns(t.native_id) for t in threads}
            if before == after:
                quiet = True
                break
    assert quiet, "a thread of the idle server ran in every second watched"


def _cpu_ns(tid: int | None) -> int:
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])


def test_client_calls_grpcio_and_this_server_alike(
    serve: Callable[..., tuple[GrpcServer, Path]], tmp_path: Path
) -> None:
    _, ours = serve((REGISTRATION, Registration("ours")))
    theirs = tmp_path / "grpcio.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(
        Registration("theirs"),  # type: ignore[arg-type]
        server,
    )
    server.add_insecure_port(f"unix://{theirs}")
    server.start()
    try:
        get_info_method = REGISTRATION.methods_by_name["GetInfo"]
        request = pluginregistration_pb2.InfoRequest()
        assert unary_call(ours, get_info_method, request, timeout=5).name == "ours"
        assert unary_call(theirs, get_info_method, request, timeout=5).name == "theirs"
    finally:
        server.stop(None).wait()


def test_client_errors(serve: Callable[..., tuple[GrpcServer, Path]], tmp_path: Path) -> None:
    release = threading.Event()
    _, path = serve((REGISTRATION, Registration(notify=lambda r, c: release.wait(10))))
    notify = REGISTRATION.methods_by_name["NotifyRegistrationStatus"]
    request = pluginregistration_pb2.RegistrationStatus()
    started = time.monotonic()
    with pytest.raises(RpcError) as late:
        unary_call(path, notify, request, timeout=0.3)
    assert late.value.status == Status.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    release.set()
    with pytest.raises(RpcError) as absent:
        unary_call(tmp_path / "nothing.sock", notify, request, timeout=1)
    assert absent.value.status == Status.UNAVAILABLE
    assert "nothing.sock" in absent.value.details


def test_a_servicer_missing_a_method_is_refused_when_added() -> None:
    class Half:
        def GetInfo(self, request: Any, context: CallContext) -> None: ...

    with pytest.raises(GrpcServerError, match="Half has no method NotifyRegistrationStatus"):
        GrpcServer("x", workers=1).add_service(REGISTRATION, Half())


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"45000m", 45.0), (b"7u", 7e-6)],
)
def test_timeouts(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"123456789S", b"12x", b"-1S", b"1.5S"])
def test_malformed_timeouts(value: bytes) -> None:
    with pytest.raises(ValueError, match="malformed grpc-timeout"):
        parse_timeout(value)


@pytest.mark.parametrize("seconds", [0.0, 0.001, 1.0, 45.0, 3600.0, 10**7])
def test_encoded_timeouts_parse_back(seconds: float) -> None:
    value = encode_timeout(seconds)
    assert len(value) <= 9
    assert parse_timeout(value) == pytest.approx(seconds, rel=1e-3, abs=1e-6)


def test_messages_are_framed_and_split() -> None:
    body = frame_message(b"abc") + frame_message(b"")
    assert split_messages(body) == [b"abc", b""]
    with pytest.raises(RpcError, match="inside a message of 3 bytes"):
        split_messages(body[:7])
    with pytest.raises(RpcError, match="inside a message prefix"):
        split_messages(b"\0\0")
    with pytest.raises(RpcError) as compressed:
        split_messages(b"\1" + body[1:])
    assert compressed.value.status == Status.UNIMPLEMENTED


def test_status_messages_round_trip() -> None:
    text = "a%b ü\n"
    encoded = encode_status_message(text)
    assert encoded == b"a%25b %C3%BC%0A"
    assert decode_status_message(encoded) == text

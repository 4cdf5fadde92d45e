"""One unary gRPC call over a Unix socket, for the agent's own checks of its sockets.

The agent calls itself to prove that its sockets answer (`KubeletPlugin.probe`, behind
``/healthz``); a grpcio channel for that would start gRPC core's threads in the agent for the
rest of its life, so the call is made here with h2, on a connection opened and closed for it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error

from dra_core.kubelet.grpcwire import (
    CONTENT_TYPE,
    RpcError,
    Status,
    decode_status_message,
    encode_timeout,
    frame_message,
    split_messages,
)

__all__ = ["unary_call"]

_STREAM = 1


def unary_call(path: Path, method: MethodDescriptor, request: Message, *, timeout: float) -> Any:
    """Call ``method`` on the socket ``path`` within ``timeout`` seconds; return its response.
    Raises RpcError: UNAVAILABLE when nothing answers on the socket, DEADLINE_EXCEEDED when
    the answer does not come in time, else the server's status."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise RpcError(Status.UNAVAILABLE, f"cannot create a socket: {exc}") from exc
    with sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as exc:
            raise RpcError(Status.UNAVAILABLE, f"cannot connect to {path}: {exc}") from exc
        h2 = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        h2.send_headers(
            _STREAM,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", f"/{method.containing_service.full_name}/{method.name}".encode()),
                (b":authority", b"localhost"),
                (b"content-type", CONTENT_TYPE),
                (b"te", b"trailers"),
                (b"grpc-timeout", encode_timeout(timeout)),
            ],
        )
        h2.send_data(_STREAM, frame_message(request.SerializeToString()), end_stream=True)
        try:
            sock.sendall(h2.data_to_send())
            body, status, details = _read_answer(sock, h2, deadline)
        except TimeoutError:
            raise RpcError(Status.DEADLINE_EXCEEDED, f"no answer within {timeout} s") from None
        except (OSError, H2Error) as exc:
            raise RpcError(Status.UNAVAILABLE, f"the connection to {path} failed: {exc}") from exc
    if status != Status.OK:
        raise RpcError(status, details)
    messages = split_messages(body)
    if len(messages) != 1:
        raise RpcError(Status.INTERNAL, f"{len(messages)} response messages; one expected")
    try:
        return GetMessageClass(method.output_type).FromString(messages[0])
    except DecodeError as exc:
        raise RpcError(Status.INTERNAL, f"cannot decode the response: {exc}") from exc


def _read_answer(
    sock: socket.socket, h2: H2Connection, deadline: float
) -> tuple[bytes, Status, str]:
    body = bytearray()
    headers: dict[bytes, bytes] = {}
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise RpcError(Status.UNAVAILABLE, "the server closed the connection")
        for event in h2.receive_data(data):
            if isinstance(event, (ResponseReceived, TrailersReceived)):
                headers.update(event.headers or ())
            elif isinstance(event, DataReceived):
                body += event.data
                h2.acknowledge_received_data(event.flow_controlled_length, _STREAM)
            elif isinstance(event, StreamReset):
                raise RpcError(
                    Status.UNAVAILABLE, f"the server reset the call ({event.error_code})"
                )
            elif isinstance(event, ConnectionTerminated) and event.last_stream_id == 0:
                raise RpcError(Status.UNAVAILABLE, "the server refused the call (GOAWAY)")
            elif isinstance(event, StreamEnded):
                return bytes(body), *_status(headers)
        sock.sendall(h2.data_to_send())


def _status(headers: dict[bytes, bytes]) -> tuple[Status, str]:
    if headers.get(b":status") != b"200":
        return Status.UNKNOWN, f"HTTP status {headers.get(b':status', b'none').decode()}"
    try:
        status = Status(int(headers.get(b"grpc-status", b"")))
    except ValueError:
        return Status.UNKNOWN, "the answer carries no valid grpc-status"
    return status, decode_status_message(headers.get(b"grpc-message", b""))

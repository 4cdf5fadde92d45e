"""The rules of gRPC over HTTP/2 that the kubelet sockets' server and client share.

What the gRPC protocol puts on an HTTP/2 stream: a request is a ``POST`` to
``/<package>.<Service>/<Method>`` with ``content-type: application/grpc`` and, when the caller
has a deadline, ``grpc-timeout``; each message travels as a 5-byte prefix (a compression flag
and a big-endian length) and the encoded protobuf; the outcome travels in the trailers as
``grpc-status`` and a percent-encoded ``grpc-message``.
"""

from __future__ import annotations

import enum
import struct
from typing import Final
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "CONTENT_TYPE",
    "MAX_MESSAGE_BYTES",
    "RpcError",
    "Status",
    "decode_status_message",
    "encode_status_message",
    "encode_timeout",
    "frame_message",
    "parse_timeout",
    "split_messages",
]

CONTENT_TYPE: Final = b"application/grpc"
#: Largest message accepted, gRPC's own default for a received message.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
_PREFIX = struct.Struct(">BI")  # compressed flag, length

#: Seconds per unit of ``grpc-timeout``: hours, minutes, seconds, milli-, micro-, nanoseconds.
_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_TIMEOUT_MAX_DIGITS: Final = 8
#: Characters a ``grpc-message`` carries as they are; everything else is percent-encoded.
_MESSAGE_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Status(enum.IntEnum):
    """gRPC status codes (the ones this project sends or reads are documented by use)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details


def parse_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` value such as ``b"29999802u"``. Raises ValueError."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > _TIMEOUT_MAX_DIGITS or not unit:
        msg = f"malformed grpc-timeout {value!r}: expected up to 8 digits and a unit"
        raise ValueError(msg)
    try:
        return int(digits) * _TIMEOUT_UNITS[unit[0]]
    except KeyError:
        msg = f"malformed grpc-timeout {value!r}: unknown unit {unit!r}"
        raise ValueError(msg) from None


def encode_timeout(seconds: float) -> bytes:
    """The ``grpc-timeout`` value for ``seconds``: the finest unit that fits in 8 digits."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        amount = max(0, int(seconds * scale))
        if amount < 10**_TIMEOUT_MAX_DIGITS:
            return str(amount).encode() + unit
    return b"99999999H"


def frame_message(payload: bytes) -> bytes:
    """``payload`` (an encoded protobuf) as one uncompressed gRPC message."""
    return _PREFIX.pack(0, len(payload)) + payload


def split_messages(buffer: bytes | bytearray) -> list[bytes]:
    """The messages of a complete request or response body. Raises RpcError: a truncated
    body or a compressed message (none is negotiated) is INTERNAL and UNIMPLEMENTED."""
    messages: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if len(buffer) - offset < _PREFIX.size:
            raise RpcError(Status.INTERNAL, "the body ends inside a message prefix")
        compressed, length = _PREFIX.unpack_from(buffer, offset)
        offset += _PREFIX.size
        if compressed:
            raise RpcError(Status.UNIMPLEMENTED, "compressed messages are not accepted")
        if len(buffer) - offset < length:
            raise RpcError(Status.INTERNAL, f"the body ends inside a message of {length} bytes")
        messages.append(bytes(buffer[offset : offset + length]))
        offset += length
    return messages


def encode_status_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value: UTF-8, percent-encoded outside printable ASCII."""
    return quote(text, safe=_MESSAGE_SAFE, encoding="utf-8").encode("ascii")


def decode_status_message(value: bytes) -> str:
    return unquote_to_bytes(value).decode("utf-8", errors="replace")

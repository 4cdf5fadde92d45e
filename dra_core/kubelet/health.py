"""The kubelet's device health stream (``v1alpha1.DRAResourceHealth``).

The kubelet opens ``NodeWatchResources`` once per plugin instance and expects every message
to list all of the driver's devices. A device not re-reported within its
``health_check_timeout_seconds`` becomes Unknown, so the stream re-sends the full list at
least every `RESEND_INTERVAL` seconds, as well as at once on every change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc
from loguru import logger

from dra_core.kubelet.proto import health_v1alpha1_pb2, health_v1alpha1_pb2_grpc

__all__ = [
    "HEALTH_CHECK_TIMEOUT_SECONDS",
    "MESSAGE_LIMIT",
    "RESEND_INTERVAL",
    "DeviceHealthState",
    "HealthBoard",
    "HealthServicer",
    "HealthView",
]

HEALTH_CHECK_TIMEOUT_SECONDS = 30
RESEND_INTERVAL = 10.0
#: The kubelet keeps at most this many characters of a health message.
MESSAGE_LIMIT = 1024
_POLL = 0.5  # how often a waiting stream looks at the stop event and its context


@dataclass(frozen=True)
class DeviceHealthState:
    """The health of one published device: ``healthy`` is None while it is unknown."""

    pool: str
    device: str
    healthy: bool | None
    message: str = ""


@runtime_checkable
class HealthView(Protocol):
    """A versioned view of all devices' health."""

    def snapshot(self) -> list[DeviceHealthState]:
        """The current health of every device."""
        ...

    def wait_changed(self, last_version: int, timeout: float) -> int:
        """Block until the version differs from ``last_version`` or ``timeout`` seconds pass;
        return the current version (versions are >= 0)."""
        ...


class HealthBoard:
    """A thread-safe `HealthView` fed with `set`; the version changes only with the content."""

    def __init__(self, states: list[DeviceHealthState] | None = None) -> None:
        self._cond = threading.Condition()
        self._states: tuple[DeviceHealthState, ...] = tuple(states or ())
        self._version = 0

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def set(self, states: list[DeviceHealthState]) -> None:
        """Replace the health of all devices; wake the streams if anything changed."""
        new = tuple(states)
        with self._cond:
            if new == self._states:
                return
            self._states = new
            self._version += 1
            self._cond.notify_all()

    def snapshot(self) -> list[DeviceHealthState]:
        with self._cond:
            return list(self._states)

    def wait_changed(self, last_version: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._version != last_version, timeout=max(timeout, 0.0))
            return self._version


_STATUS = {
    True: health_v1alpha1_pb2.HEALTHY,
    False: health_v1alpha1_pb2.UNHEALTHY,
    None: health_v1alpha1_pb2.UNKNOWN,
}


def _message(states: list[DeviceHealthState]) -> health_v1alpha1_pb2.NodeWatchResourcesResponse:
    now = int(time.time())
    response = health_v1alpha1_pb2.NodeWatchResourcesResponse()
    for state in states:
        response.devices.add(
            device=health_v1alpha1_pb2.DeviceIdentifier(
                pool_name=state.pool, device_name=state.device
            ),
            health=_STATUS[state.healthy],
            last_updated_time=now,
            health_check_timeout_seconds=HEALTH_CHECK_TIMEOUT_SECONDS,
            message=state.message[:MESSAGE_LIMIT],
        )
    return response


class HealthServicer(health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """Streams a `HealthView` to the kubelet until the client leaves or ``stop`` is set.

    Each open stream holds one worker thread of the gRPC server.
    """

    def __init__(
        self,
        view: HealthView,
        stop: threading.Event,
        *,
        resend_interval: float = RESEND_INTERVAL,
    ) -> None:
        self._view = view
        self._stop = stop
        self._resend_interval = resend_interval

    def NodeWatchResources(
        self,
        request: health_v1alpha1_pb2.NodeWatchResourcesRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[health_v1alpha1_pb2.NodeWatchResourcesResponse]:
        logger.info("kubelet opened the device health stream")
        version = self._view.wait_changed(-1, 0.0)
        yield _message(self._view.snapshot())
        sent_at = time.monotonic()
        while not self._stop.is_set() and context.is_active():
            remaining = self._resend_interval - (time.monotonic() - sent_at)
            current = self._view.wait_changed(version, min(_POLL, max(remaining, 0.0)))
            if current == version and time.monotonic() - sent_at < self._resend_interval:
                continue
            if self._stop.is_set() or not context.is_active():
                break
            version = current
            yield _message(self._view.snapshot())
            sent_at = time.monotonic()
        logger.info("device health stream ended")

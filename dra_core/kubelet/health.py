"""The kubelet's device health stream, ``DRAResourceHealth`` in versions v1 and v1alpha1.

Both versions carry the same messages under the same field numbers, so one implementation,
parameterised by the generated message module, serves both from one `HealthView`. The
kubelet (1.37 and later) picks v1 when the plugin advertises both at registration, and older
kubelets take v1alpha1.

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
from types import ModuleType
from typing import Any, ClassVar, Protocol, runtime_checkable

import grpc
from loguru import logger

from dra_core.kubelet.proto import (
    health_v1_pb2,
    health_v1_pb2_grpc,
    health_v1alpha1_pb2,
    health_v1alpha1_pb2_grpc,
)

__all__ = [
    "HEALTH_CHECK_TIMEOUT_SECONDS",
    "MESSAGE_LIMIT",
    "RESEND_INTERVAL",
    "DeviceHealthState",
    "HealthBoard",
    "HealthServicer",
    "HealthV1alpha1Servicer",
    "HealthView",
    "add_health_servicers",
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


#: HealthStatus value names by `DeviceHealthState.healthy`; both versions share them.
_STATUS = {True: "HEALTHY", False: "UNHEALTHY", None: "UNKNOWN"}


def _message(messages: ModuleType, states: list[DeviceHealthState]) -> Any:
    """A ``NodeWatchResourcesResponse`` of the generated module ``messages`` listing ``states``."""
    now = int(time.time())
    response = messages.NodeWatchResourcesResponse()
    for state in states:
        response.devices.add(
            device=messages.DeviceIdentifier(pool_name=state.pool, device_name=state.device),
            health=messages.HealthStatus.Value(_STATUS[state.healthy]),
            last_updated_time=now,
            health_check_timeout_seconds=HEALTH_CHECK_TIMEOUT_SECONDS,
            message=state.message[:MESSAGE_LIMIT],
        )
    return response


class _HealthStream:
    """The shared implementation: streams a `HealthView` until the client leaves or ``stop``
    is set. Subclasses name the generated message module in ``_messages``.

    Each open stream holds one worker thread of the gRPC server.
    """

    _messages: ClassVar[ModuleType]

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

    @property
    def service_name(self) -> str:
        """The full gRPC service name, which is also its registration string."""
        name: str = self._messages.DESCRIPTOR.services_by_name["DRAResourceHealth"].full_name
        return name

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        service = self.service_name
        logger.info("kubelet opened the device health stream ({})", service)
        version = self._view.wait_changed(-1, 0.0)
        yield _message(self._messages, self._view.snapshot())
        sent_at = time.monotonic()
        while not self._stop.is_set() and context.is_active():
            remaining = self._resend_interval - (time.monotonic() - sent_at)
            current = self._view.wait_changed(version, min(_POLL, max(remaining, 0.0)))
            if current == version and time.monotonic() - sent_at < self._resend_interval:
                continue
            if self._stop.is_set() or not context.is_active():
                break
            version = current
            yield _message(self._messages, self._view.snapshot())
            sent_at = time.monotonic()
        logger.info("device health stream ended ({})", service)


class HealthServicer(_HealthStream, health_v1_pb2_grpc.DRAResourceHealthServicer):
    """``v1.DRAResourceHealth``, the version kubelets 1.37 and later prefer."""

    _messages: ClassVar[ModuleType] = health_v1_pb2


class HealthV1alpha1Servicer(_HealthStream, health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """``v1alpha1.DRAResourceHealth``, for kubelets 1.34 to 1.36."""

    _messages: ClassVar[ModuleType] = health_v1alpha1_pb2


def add_health_servicers(
    server: grpc.Server,
    view: HealthView,
    stop: threading.Event,
    *,
    resend_interval: float = RESEND_INTERVAL,
) -> None:
    """Serve ``view`` on ``server`` as both v1 and v1alpha1; streams end when ``stop`` is set."""
    health_v1_pb2_grpc.add_DRAResourceHealthServicer_to_server(
        HealthServicer(view, stop, resend_interval=resend_interval), server
    )
    health_v1alpha1_pb2_grpc.add_DRAResourceHealthServicer_to_server(
        HealthV1alpha1Servicer(view, stop, resend_interval=resend_interval), server
    )

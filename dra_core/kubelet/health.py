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

from google.protobuf.descriptor import ServiceDescriptor

from dra_core.kubelet.grpcserver import CallContext, GrpcServer
from dra_core.kubelet.proto import health_v1_pb2, health_v1alpha1_pb2
from dra_core.lazylog import logger

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
        """Block until the version differs from ``last_version``, ``timeout`` seconds pass or
        `wake` is called; return the current version (versions are >= 0)."""
        ...

    def wake(self) -> None:
        """Return every `wait_changed` now (a stream whose call ended stops waiting)."""
        ...


class HealthBoard:
    """A thread-safe `HealthView` fed with `set`; the version changes only with the content."""

    def __init__(self, states: list[DeviceHealthState] | None = None) -> None:
        self._cond = threading.Condition()
        self._states: tuple[DeviceHealthState, ...] = tuple(states or ())
        self._version = 0
        self._wakeups = 0

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
            wakeups = self._wakeups
            self._cond.wait_for(
                lambda: self._version != last_version or self._wakeups != wakeups,
                timeout=max(timeout, 0.0),
            )
            return self._version

    def wake(self) -> None:
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()


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
    def service(self) -> ServiceDescriptor:
        """The gRPC service this serves."""
        service: ServiceDescriptor = self._messages.DESCRIPTOR.services_by_name["DRAResourceHealth"]
        return service

    @property
    def service_name(self) -> str:
        """The full gRPC service name, which is also its registration string."""
        return self.service.full_name

    def NodeWatchResources(self, request: Any, context: CallContext) -> Iterator[Any]:
        service = self.service_name
        logger.info("kubelet opened the device health stream ({})", service)
        context.add_callback(self._view.wake)  # the wait below ends with the call
        version = self._view.wait_changed(-1, 0.0)
        yield _message(self._messages, self._view.snapshot())
        sent_at = time.monotonic()
        while not self._stop.is_set() and context.is_active():
            remaining = self._resend_interval - (time.monotonic() - sent_at)
            current = self._view.wait_changed(version, max(remaining, 0.0))
            if self._stop.is_set() or not context.is_active():
                break
            if current == version and time.monotonic() - sent_at < self._resend_interval:
                continue
            version = current
            yield _message(self._messages, self._view.snapshot())
            sent_at = time.monotonic()
        logger.info("device health stream ended ({})", service)


class HealthServicer(_HealthStream):
    """``v1.DRAResourceHealth``, the version kubelets 1.37 and later prefer."""

    _messages: ClassVar[ModuleType] = health_v1_pb2


class HealthV1alpha1Servicer(_HealthStream):
    """``v1alpha1.DRAResourceHealth``, for kubelets 1.34 to 1.36."""

    _messages: ClassVar[ModuleType] = health_v1alpha1_pb2


def add_health_servicers(
    server: GrpcServer,
    view: HealthView,
    stop: threading.Event,
    *,
    resend_interval: float = RESEND_INTERVAL,
) -> None:
    """Serve ``view`` on ``server`` as both v1 and v1alpha1; streams end when ``stop`` is set."""
    for servicer in (
        HealthServicer(view, stop, resend_interval=resend_interval),
        HealthV1alpha1Servicer(view, stop, resend_interval=resend_interval),
    ):
        server.add_service(servicer.service, servicer)

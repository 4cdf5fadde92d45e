"""The kubelet plugin registration service (``pluginregistration.Registration``).

The kubelet's plugin watcher finds the registration socket, calls ``GetInfo`` (with a one
second limit) to learn the driver name, the DRA socket and the services offered, and then
reports the outcome with ``NotifyRegistrationStatus``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from dra_core.kubelet.grpcserver import CallContext
from dra_core.kubelet.proto import pluginregistration_pb2
from dra_core.lazylog import logger

__all__ = [
    "DRA_PLUGIN_TYPE",
    "DRA_SERVICES",
    "HEALTH_SERVICES",
    "RegistrationServicer",
    "RegistrationStatus",
    "supported_versions",
]

DRA_PLUGIN_TYPE = "DRAPlugin"
#: Registration strings of the DRA services, preferred first (the kubelet picks the first of
#: ours that it knows).
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
#: Registration strings of the device health service, each its full gRPC service name. The
#: kubelet opens a health stream only for a service advertised here; 1.37 and later pick v1
#: when both are listed, older kubelets know only v1alpha1.
HEALTH_SERVICES = ("v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth")


def supported_versions(*, health: bool) -> list[str]:
    """What GetInfo advertises: both DRA versions, plus both health versions when served."""
    return [*DRA_SERVICES, *(HEALTH_SERVICES if health else ())]


@dataclass(frozen=True)
class RegistrationStatus:
    """What the kubelet last reported through NotifyRegistrationStatus."""

    registered: bool
    error: str = ""


class RegistrationServicer:
    """Answers the kubelet's plugin watcher; `registered` is set once the kubelet accepts us."""

    def __init__(self, driver_name: str, endpoint: str, versions: Sequence[str]) -> None:
        self._info = pluginregistration_pb2.PluginInfo(
            type=DRA_PLUGIN_TYPE,
            name=driver_name,
            endpoint=endpoint,
            supported_versions=list(versions),
        )
        self._driver_name = driver_name
        self._lock = threading.Lock()
        self._status: RegistrationStatus | None = None
        #: Set while the kubelet reports us registered; cleared when it reports a failure.
        self.registered = threading.Event()

    @property
    def status(self) -> RegistrationStatus | None:
        """The kubelet's last report, or None before the first one."""
        with self._lock:
            return self._status

    def GetInfo(
        self, request: pluginregistration_pb2.InfoRequest, context: CallContext
    ) -> pluginregistration_pb2.PluginInfo:
        # Not logged: the kubelet calls it as soon as the socket appears, while the agent still
        # starts and may not have loaded its logger (dra_core.lazylog); the kubelet's
        # NotifyRegistrationStatus that follows is logged.
        info = pluginregistration_pb2.PluginInfo()
        info.CopyFrom(self._info)
        return info

    def NotifyRegistrationStatus(
        self, request: pluginregistration_pb2.RegistrationStatus, context: CallContext
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        status = RegistrationStatus(registered=request.plugin_registered, error=request.error)
        with self._lock:
            self._status = status
        if status.registered:
            logger.info("registered with the kubelet as DRA driver {}", self._driver_name)
            self.registered.set()
        else:
            self.registered.clear()
            logger.error(
                "the kubelet rejected DRA driver {}: {} (check the driver name, the kubelet "
                "version (1.34 or later for v1.DRAPlugin) and the kubelet log)",
                self._driver_name,
                status.error or "no reason given",
            )
        return pluginregistration_pb2.RegistrationStatusResponse()

"""The kubelet side of a DRA driver: plugin registration, the DRA gRPC services, the
device health stream, and their unix sockets.

Wire it up with a `NodeService` (the prepare/unprepare pipeline)::

    plugin = KubeletPlugin(KubeletPluginSettings(driver_name="gpu.example.com"), service)
    plugin.start()
    plugin.registered.wait(30)
    ...
    plugin.stop()
"""

from __future__ import annotations

from dra_core.kubelet.health import (
    DeviceHealthState,
    HealthBoard,
    HealthServicer,
    HealthView,
)
from dra_core.kubelet.registration import (
    RegistrationServicer,
    RegistrationStatus,
    supported_versions,
)
from dra_core.kubelet.server import KubeletPlugin, KubeletPluginError, KubeletPluginSettings
from dra_core.kubelet.service import NodeService
from dra_core.kubelet.servicer import DRAv1beta1Servicer, DRAv1Servicer, add_dra_servicers
from dra_core.kubelet.sockets import SocketError, SocketPaths

__all__ = [
    "DRAv1Servicer",
    "DRAv1beta1Servicer",
    "DeviceHealthState",
    "HealthBoard",
    "HealthServicer",
    "HealthView",
    "KubeletPlugin",
    "KubeletPluginError",
    "KubeletPluginSettings",
    "NodeService",
    "RegistrationServicer",
    "RegistrationStatus",
    "SocketError",
    "SocketPaths",
    "add_dra_servicers",
    "supported_versions",
]

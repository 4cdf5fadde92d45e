"""The kubelet plugin: the DRA gRPC server and the registration server on their sockets.

`KubeletPlugin.start` serves the DRA services (v1, v1beta1 and, with a health view, the
health stream as v1 and v1alpha1) on the plugin socket first, then registration on its own
small server and socket, so that the kubelet only finds the plugin once it can be called, and
``GetInfo`` answers at once however busy the DRA server's threads are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from dra_core.kubelet.grpcclient import unary_call
from dra_core.kubelet.grpcserver import GrpcServer
from dra_core.kubelet.grpcwire import RpcError, Status
from dra_core.kubelet.health import RESEND_INTERVAL, HealthView, add_health_servicers
from dra_core.kubelet.proto import dra_v1_pb2, pluginregistration_pb2
from dra_core.kubelet.registration import (
    DRA_PLUGIN_TYPE,
    RegistrationServicer,
    RegistrationStatus,
    supported_versions,
)
from dra_core.kubelet.service import NodeService
from dra_core.kubelet.servicer import add_dra_servicers
from dra_core.kubelet.sockets import (
    DEFAULT_REGISTRATION_DIR,
    SocketError,
    SocketPaths,
    prepare_socket,
    remove_socket,
)
from dra_core.lazylog import logger

__all__ = ["KubeletPlugin", "KubeletPluginError", "KubeletPluginSettings"]

#: Extra DRA server threads when health is served: each open health stream holds one.
_HEALTH_THREADS = 2
_REGISTRATION_SERVICE = pluginregistration_pb2.DESCRIPTOR.services_by_name["Registration"]


class KubeletPluginError(RuntimeError):
    """The plugin could not start: a socket could not be created or bound."""


@dataclass(frozen=True)
class KubeletPluginSettings:
    """How to serve the kubelet.

    ``plugin_dir`` defaults to ``/var/lib/kubelet/plugins/<driver_name>``. ``instance_id``
    (e.g. the pod UID) selects per-instance socket names for rolling updates (kubelet 1.33
    and later). ``health`` enables the device health stream. ``max_workers`` bounds the
    concurrent prepare/unprepare calls; calls beyond it queue. ``socket_mode`` is applied to
    both sockets.
    """

    driver_name: str
    registration_dir: Path = DEFAULT_REGISTRATION_DIR
    plugin_dir: Path | None = None
    instance_id: str | None = None
    health: HealthView | None = None
    #: Many, because a call waiting for a slow API server holds its worker until its deadline;
    #: the claim service lets only 48 calls wait so (`dra_core.node.service`), so the others
    #: stay free for calls the checkpoint answers and for unprepares. An idle thread costs
    #: little.
    max_workers: int = 64
    socket_mode: int = 0o600
    #: How often the health stream re-sends an unchanged list (the kubelet's timeout is 30 s).
    health_resend_interval: float = RESEND_INTERVAL


def _bind(server: GrpcServer, path: Path, mode: int) -> None:
    try:
        prepare_socket(path)
        server.listen(path)
        path.chmod(mode)
    except (OSError, SocketError) as exc:
        msg = f"cannot listen on {path}: {exc}; check that the directory is writable"
        raise KubeletPluginError(msg) from exc


class KubeletPlugin:
    """The node agent's face to the kubelet; see the module docstring."""

    def __init__(self, settings: KubeletPluginSettings, service: NodeService) -> None:
        if settings.socket_mode & ~0o660:
            msg = f"socket mode {settings.socket_mode:#o} is too open; use 0o600 or 0o660"
            raise KubeletPluginError(msg)
        self.settings = settings
        self._service = service
        try:
            self._paths = SocketPaths.for_driver(
                settings.driver_name,
                registration_dir=settings.registration_dir,
                plugin_dir=settings.plugin_dir,
                instance_id=settings.instance_id,
            )
        except SocketError as exc:
            raise KubeletPluginError(str(exc)) from exc
        self._stop = threading.Event()
        self._registration = RegistrationServicer(
            settings.driver_name,
            str(self._paths.dra),
            supported_versions(health=settings.health is not None),
        )
        self._dra_server: GrpcServer | None = None
        self._registration_server: GrpcServer | None = None
        self._lock = threading.Lock()

    @property
    def registration_socket(self) -> Path:
        return self._paths.registration

    @property
    def dra_socket(self) -> Path:
        return self._paths.dra

    @property
    def paths(self) -> SocketPaths:
        return self._paths

    @property
    def registered(self) -> threading.Event:
        """Set once the kubelet reports a successful registration."""
        return self._registration.registered

    @property
    def registration_status(self) -> RegistrationStatus | None:
        """The kubelet's last registration report, or None before the first."""
        return self._registration.status

    @property
    def running(self) -> bool:
        with self._lock:
            return self._registration_server is not None

    def start(self) -> None:
        """Serve the DRA socket, then the registration socket. Raises KubeletPluginError."""
        with self._lock:
            if self._dra_server is not None:
                msg = "the kubelet plugin is already started"
                raise KubeletPluginError(msg)
            self._stop.clear()
            settings = self.settings
            workers = settings.max_workers + (_HEALTH_THREADS if settings.health else 0)
            dra_server = GrpcServer("dra", workers=workers)
            add_dra_servicers(dra_server, self._service)
            if settings.health is not None:
                add_health_servicers(
                    dra_server,
                    settings.health,
                    self._stop,
                    resend_interval=settings.health_resend_interval,
                )
            _bind(dra_server, self._paths.dra, settings.socket_mode)
            dra_server.start()
            self._dra_server = dra_server
            try:
                # Registration calls return at once: answered on the connection's thread.
                registration_server = GrpcServer("registration", workers=None)
                registration_server.add_service(_REGISTRATION_SERVICE, self._registration)
                _bind(registration_server, self._paths.registration, settings.socket_mode)
                registration_server.start()
            except BaseException:
                self._dra_server = None
                dra_server.stop(None)
                remove_socket(self._paths.dra)
                raise
            self._registration_server = registration_server
        logger.info(
            "serving the kubelet: DRA on {}, registration on {}",
            self._paths.dra,
            self._paths.registration,
        )

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop both servers (registration first) and remove this instance's sockets.

        Calls in flight get ``grace`` seconds to finish; health streams end at once.
        """
        with self._lock:
            self._stop.set()
            registration_server, self._registration_server = self._registration_server, None
            dra_server, self._dra_server = self._dra_server, None
        if registration_server is not None:
            registration_server.stop(None)
            remove_socket(self._paths.registration)
            self.registered.clear()
        if dra_server is not None:
            dra_server.stop(grace)
            remove_socket(self._paths.dra)
            logger.info("stopped serving the kubelet")

    def probe(self, timeout: float = 1.0, *, busy: bool = False) -> list[str]:
        """Check that both sockets answer; return the problems found (empty: live).

        Calls GetInfo on the registration socket and an empty NodeUnprepareResources on the
        DRA socket, each within ``timeout`` seconds. With ``busy`` (the caller knows that
        every DRA worker is taken by calls that still make progress, such as reads from a
        slow API server), a DRA call that times out in the queue is not a problem.
        """
        problems: list[str] = []
        try:
            info = unary_call(
                self._paths.registration,
                _REGISTRATION_SERVICE.methods_by_name["GetInfo"],
                pluginregistration_pb2.InfoRequest(),
                timeout=timeout,
            )
        except RpcError as exc:
            problems.append(f"registration socket {self._paths.registration}: {exc}")
        else:
            if info.type != DRA_PLUGIN_TYPE or info.name != self.settings.driver_name:
                problems.append(
                    f"registration socket {self._paths.registration}: GetInfo answered "
                    f"type {info.type!r} name {info.name!r}, not this plugin"
                )
        try:
            unary_call(
                self._paths.dra,
                dra_v1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"].methods_by_name[
                    "NodeUnprepareResources"
                ],
                dra_v1_pb2.NodeUnprepareResourcesRequest(),
                timeout=timeout,
            )
        except RpcError as exc:
            if not (busy and exc.status == Status.DEADLINE_EXCEEDED):
                problems.append(f"DRA socket {self._paths.dra}: {exc}")
        return problems

"""A fake kubelet: drives a kubelet plugin over its real unix sockets, as the kubelet does.

`FakeKubelet` registers (GetInfo, version choice, NotifyRegistrationStatus), then calls
NodePrepareResources / NodeUnprepareResources on the DRA socket the plugin advertised, and
reads the device health stream. It applies the kubelet's response checks (every requested
claim answered, no unknown claim), so tests of a node service see what the kubelet would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc

from dra_core.kubelet.proto import (
    dra_v1_pb2,
    dra_v1_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    health_v1_pb2,
    health_v1_pb2_grpc,
    health_v1alpha1_pb2,
    health_v1alpha1_pb2_grpc,
    pluginregistration_pb2,
    pluginregistration_pb2_grpc,
)
from dra_core.model import ClaimRef, ClaimResult, ResultDevice

__all__ = ["FakeKubelet", "HealthReport", "KubeletProtocolError", "PluginInfo"]

ApiVersion = Literal["v1", "v1beta1"]
HealthVersion = Literal["v1", "v1alpha1"]
_HEALTH_MODULES: dict[str, tuple[Any, Any]] = {
    "v1": (health_v1_pb2, health_v1_pb2_grpc),
    "v1alpha1": (health_v1alpha1_pb2, health_v1alpha1_pb2_grpc),
}
#: The kubelet's own preference list (1.34 and later).
KUBELET_DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
_HEALTH = {
    health_v1alpha1_pb2.HEALTHY: True,
    health_v1alpha1_pb2.UNHEALTHY: False,
    health_v1alpha1_pb2.UNKNOWN: None,
}


class KubeletProtocolError(AssertionError):
    """The plugin answered something the real kubelet would reject."""


@dataclass(frozen=True)
class PluginInfo:
    """The plugin's GetInfo answer."""

    type: str
    name: str
    endpoint: str
    supported_versions: tuple[str, ...]


@dataclass(frozen=True)
class HealthReport:
    """One device of one health stream message."""

    pool: str
    device: str
    healthy: bool | None
    message: str
    timeout_seconds: int


def _unix(path: Path | str) -> str:
    return f"unix://{Path(path).absolute()}"


class FakeKubelet:
    """Talks to one plugin instance found at ``registration_socket``; use as a context manager."""

    def __init__(self, registration_socket: Path | str, *, timeout: float = 5.0) -> None:
        self.registration_socket = Path(registration_socket)
        self.timeout = timeout
        self.info: PluginInfo | None = None
        self.api: ApiVersion | None = None
        self._channels: list[grpc.Channel] = []
        self._dra: grpc.Channel | None = None

    def __enter__(self) -> FakeKubelet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._dra = None

    def _channel(self, path: Path | str) -> grpc.Channel:
        channel = grpc.insecure_channel(_unix(path))
        self._channels.append(channel)
        return channel

    def get_info(self, timeout: float = 1.0) -> PluginInfo:
        """GetInfo with the kubelet's one-second limit."""
        stub = pluginregistration_pb2_grpc.RegistrationStub(self._channel(self.registration_socket))
        info = stub.GetInfo(pluginregistration_pb2.InfoRequest(), timeout=timeout)
        return PluginInfo(
            type=info.type,
            name=info.name,
            endpoint=info.endpoint,
            supported_versions=tuple(info.supported_versions),
        )

    def register(self, *, api: ApiVersion | None = None, error: str = "") -> PluginInfo:
        """Do the kubelet's registration; ``api`` forces a version, ``error`` a rejection."""
        info = self.get_info()
        if info.type != "DRAPlugin":
            msg = f"GetInfo type {info.type!r}, want 'DRAPlugin'"
            raise KubeletProtocolError(msg)
        chosen = next((v for v in info.supported_versions if v in KUBELET_DRA_SERVICES), None)
        if chosen is None:
            msg = f"none of {list(info.supported_versions)} is a DRA service the kubelet speaks"
            raise KubeletProtocolError(msg)
        if api is not None:
            if f"{api}.DRAPlugin" not in info.supported_versions:
                msg = f"{api}.DRAPlugin is not advertised: {list(info.supported_versions)}"
                raise KubeletProtocolError(msg)
            chosen = f"{api}.DRAPlugin"
        stub = pluginregistration_pb2_grpc.RegistrationStub(self._channel(self.registration_socket))
        stub.NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=not error, error=error),
            timeout=self.timeout,
        )
        self.info = info
        self.api = "v1" if chosen == "v1.DRAPlugin" else "v1beta1"
        self._dra = self._channel(info.endpoint or self.registration_socket)
        return info

    def _stub(self) -> Any:
        if self._dra is None or self.api is None:
            msg = "call register() first"
            raise KubeletProtocolError(msg)
        grpc_module = dra_v1_pb2_grpc if self.api == "v1" else dra_v1beta1_pb2_grpc
        return grpc_module.DRAPluginStub(self._dra)

    def _messages(self) -> Any:
        return dra_v1_pb2 if self.api == "v1" else dra_v1beta1_pb2

    @staticmethod
    def _check_keys(call: str, claims: Sequence[ClaimRef], keys: Sequence[str]) -> None:
        wanted = {c.uid for c in claims}
        unknown = sorted(set(keys) - wanted)
        if unknown:
            msg = f"{call}: response contains unknown claim UIDs {unknown}"
            raise KubeletProtocolError(msg)
        if len(set(keys)) < len(wanted):
            msg = f"{call} skipped {len(wanted) - len(set(keys))} ResourceClaims"
            raise KubeletProtocolError(msg)

    def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, ClaimResult]:
        """NodePrepareResources; the results keyed by claim UID."""
        messages = self._messages()
        request = messages.NodePrepareResourcesRequest(
            claims=[messages.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
        )
        response = self._stub().NodePrepareResources(request, timeout=45.0)
        self._check_keys("NodePrepareResources", claims, list(response.claims))
        results: dict[str, ClaimResult] = {}
        for uid, entry in response.claims.items():
            devices = tuple(
                ResultDevice(
                    request_names=tuple(d.request_names),
                    pool_name=d.pool_name,
                    device_name=d.device_name,
                    cdi_device_ids=tuple(d.cdi_device_ids),
                    share_id=d.share_id if self.api == "v1" and d.HasField("share_id") else None,
                )
                for d in entry.devices
            )
            results[uid] = ClaimResult(devices=devices, error=entry.error)
        return results

    def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """NodeUnprepareResources; claim UID -> error ("" for success)."""
        messages = self._messages()
        request = messages.NodeUnprepareResourcesRequest(
            claims=[messages.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
        )
        response = self._stub().NodeUnprepareResources(request, timeout=45.0)
        self._check_keys("NodeUnprepareResources", claims, list(response.claims))
        return {uid: entry.error for uid, entry in response.claims.items()}

    def health_version(self) -> HealthVersion:
        """The health service the kubelet would watch: v1 when advertised, else v1alpha1."""
        if self.info is None:
            msg = "call register() first"
            raise KubeletProtocolError(msg)
        for version in ("v1", "v1alpha1"):
            if f"{version}.DRAResourceHealth" in self.info.supported_versions:
                return version
        msg = f"no health service is advertised: {list(self.info.supported_versions)}"
        raise KubeletProtocolError(msg)

    def watch_health(
        self, timeout: float = 30.0, *, api: HealthVersion | None = None
    ) -> Iterator[list[HealthReport]]:
        """The health stream's messages, as they come (over ``api``, by default the version
        the kubelet would choose); closes the stream when dropped."""
        if self._dra is None:
            msg = "call register() first"
            raise KubeletProtocolError(msg)
        messages, grpc_module = _HEALTH_MODULES[api or self.health_version()]
        stub = grpc_module.DRAResourceHealthStub(self._dra)
        stream = stub.NodeWatchResources(messages.NodeWatchResourcesRequest(), timeout=timeout)
        try:
            for response in stream:
                yield [
                    HealthReport(
                        pool=d.device.pool_name,
                        device=d.device.device_name,
                        healthy=_HEALTH[d.health],
                        message=d.message,
                        timeout_seconds=d.health_check_timeout_seconds,
                    )
                    for d in response.devices
                ]
        finally:
            stream.cancel()

    def read_health(
        self, count: int, timeout: float = 30.0, *, api: HealthVersion | None = None
    ) -> list[list[HealthReport]]:
        """The first ``count`` messages of a fresh health stream."""
        messages: list[list[HealthReport]] = []
        for message in self.watch_health(timeout, api=api):
            messages.append(message)
            if len(messages) >= count:
                return messages
        msg = f"the health stream ended after {len(messages)} of {count} messages"
        raise KubeletProtocolError(msg)

"""A ClaimService on real files (checkpoint, CDI directory, lock) with a recording backend and
an in-memory view of allocated claims, for tests of the prepare pipeline without a control plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dra_core import BackendIdentity, ContainerEdits, Device, Inventory, PreparedDevice, hookimpl
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import claim_path
from dra_core.kube.client import ApiError
from dra_core.model import ClaimRef
from dra_core.node.lock import DriverLock
from dra_core.node.service import ClaimService
from dra_core.plugins import from_objects

DRIVER = "identity.dra-core.dev"
NODE = "node-1"
BOOT = "boot-1"


class Backend:
    """Records what it prepared and unprepared; each device gets one environment variable."""

    def __init__(self, driver: str = DRIVER, cdi_class: str = "identity") -> None:
        self.identity = BackendIdentity(driver, "dra-core.dev", cdi_class)
        self.prepared: list[str] = []
        self.unprepared: list[str] = []

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return self.identity

    @hookimpl
    def dra_prepare(self, claim: Any) -> list[PreparedDevice]:
        self.prepared.append(claim.ref.uid)
        return [PreparedDevice(d, ContainerEdits(env={"DEVICE": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: Any) -> bool:
        self.unprepared.append(claim.ref.uid)
        return True


class ApiClaims:
    """The API server as far as reading allocated claims goes; counts the reads."""

    timeout = 10.0

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.reads: list[str] = []

    def add(self, ref: ClaimRef) -> ClaimRef:
        result = {"request": "dev", "driver": DRIVER, "pool": NODE, "device": "dev-0"}
        self.objects[claim_path(ref)] = {
            "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
            "status": {"allocation": {"devices": {"results": [result]}}},
        }
        return ref

    def get(self, path: str, query: Any = None, *, timeout: float | None = None) -> Any:
        self.reads.append(path)
        if path not in self.objects:
            raise ApiError("GET", path, 404, "not found")
        return self.objects[path]


def claim_service(tmp_path: Path, api: ApiClaims, backend: Backend) -> ClaimService:
    return ClaimService(
        hooks=from_objects("identity", backend),
        context=NodeContext(node_name=NODE, driver_name=DRIVER),
        client=api,  # type: ignore[arg-type]
        checkpoint=Checkpoint.open(tmp_path / "plugin" / "checkpoint.json", boot_id=BOOT),
        cdi=CdiSpecs(tmp_path / "cdi", backend.dra_backend_identity()),
        lock=DriverLock(tmp_path / "plugin" / "serialize.lock"),
        inventory=lambda: Inventory(devices=(Device("dev-0"),)),
        pools={NODE},
        boot_id=BOOT,
    )

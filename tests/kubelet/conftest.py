"""Fixtures for the kubelet plugin tests: short socket directories and a small NodeService."""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from dra_core.kubelet import KubeletPlugin, KubeletPluginSettings
from dra_core.model import ClaimRef, ClaimResult, ResultDevice

DRIVER = "gpu.example.com"


class TableNodeService:
    """A NodeService double at the collaborator boundary: prepares each claim to one device.

    A claim whose name starts with ``shared`` gets a share ID; ``fail`` makes the next calls
    raise; UIDs in ``forget`` are left out of the answers; ``errors`` maps a UID to its error.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prepared: dict[str, ClaimRef] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.fail: Exception | None = None
        self.forget: set[str] = set()
        self.errors: dict[str, str] = {}
        self.deadlines: list[float | None] = []
        self.unprepare_deadlines: list[float | None] = []

    def prepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, ClaimResult]:
        with self.lock:
            self.calls.append(("prepare", [c.uid for c in claims]))
            self.deadlines.append(deadline)
            if self.fail is not None:
                raise self.fail
            results = {}
            for claim in claims:
                if claim.uid in self.forget:
                    continue
                if claim.uid in self.errors:
                    results[claim.uid] = ClaimResult(error=self.errors[claim.uid])
                    continue
                self.prepared[claim.uid] = claim
                share = f"share-{claim.uid[:8]}" if claim.name.startswith("shared") else None
                device = ResultDevice(
                    request_names=("gpu",),
                    pool_name="node-1",
                    device_name=f"gpu-{claim.name}",
                    cdi_device_ids=(f"example.com/gpu={claim.uid}",),
                    share_id=share,
                )
                results[claim.uid] = ClaimResult(devices=(device,))
            return results

    def unprepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, str]:
        with self.lock:
            self.calls.append(("unprepare", [c.uid for c in claims]))
            self.unprepare_deadlines.append(deadline)
            if self.fail is not None:
                raise self.fail
            results = {}
            for claim in claims:
                if claim.uid in self.forget:
                    continue
                self.prepared.pop(claim.uid, None)
                results[claim.uid] = self.errors.get(claim.uid, "")
            return results


def claim(name: str = "claim", namespace: str = "default") -> ClaimRef:
    return ClaimRef(namespace=namespace, name=name, uid=str(uuid.uuid4()))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service() -> TableNodeService:
    return TableNodeService()


PluginFactory = Callable[..., KubeletPlugin]


@pytest.fixture
def make_plugin(sockdir: Path, service: TableNodeService) -> Iterator[PluginFactory]:
    """Build (and at teardown stop) KubeletPlugins whose sockets live under ``sockdir``."""
    plugins: list[KubeletPlugin] = []

    def make(start: bool = True, **overrides: object) -> KubeletPlugin:
        settings: dict[str, object] = {
            "driver_name": DRIVER,
            "registration_dir": sockdir / "registry",
            "plugin_dir": sockdir / "plugins" / DRIVER,
        }
        settings.update(overrides)
        plugin = KubeletPlugin(KubeletPluginSettings(**settings), service)  # type: ignore[arg-type]
        plugins.append(plugin)
        if start:
            plugin.start()
        return plugin

    yield make
    for plugin in plugins:
        plugin.stop(grace=0)

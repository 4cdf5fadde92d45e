"""``dra_device_classes`` gets the backend's options: ``dra-core render`` takes the backend's
flags (and their environment variables) as ``run`` does and passes the parsed values; a
backend that does not ask for them is called as before."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import yaml

import dra_core.plugins
from dra_core import BackendIdentity, BackendOption, DeviceClassSpec, hookimpl
from dra_core.cli import main
from dra_core.plugins import Hooks, from_objects

IDENTITY = BackendIdentity("npu.example.com", "example.com", "npu")


class ProfileBackend:
    """Declares one DeviceClass per partition profile named by ``--profiles``."""

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return IDENTITY

    @hookimpl
    def dra_backend_options(self) -> Sequence[BackendOption]:
        return [BackendOption("profiles", "partition profiles", default="full", env="NPU_PROFILES")]

    @hookimpl
    def dra_device_classes(
        self, identity: BackendIdentity, options: Mapping[str, str | None]
    ) -> Sequence[DeviceClassSpec]:
        profiles = (options.get("profiles") or "full").split(",")
        driver = identity.driver_name
        return [
            DeviceClassSpec(f"{p}.{driver}", (f'device.attributes["{driver}"].profile == "{p}"',))
            for p in profiles
        ]


class PlainBackend:
    """An implementation without the ``options`` argument."""

    @hookimpl
    def dra_device_classes(self, identity: BackendIdentity) -> Sequence[DeviceClassSpec]:
        return [DeviceClassSpec(identity.driver_name, ("true",))]


def test_the_hook_gets_the_options_and_older_implementations_still_work() -> None:
    hooks = from_objects("npu", ProfileBackend())
    assert [c.name for c in hooks.device_classes(IDENTITY, {"profiles": "half,quarter"})] == [
        "half.npu.example.com",
        "quarter.npu.example.com",
    ]
    assert [c.name for c in hooks.device_classes(IDENTITY)] == ["full.npu.example.com"]
    plain = from_objects("plain", PlainBackend())
    assert [c.name for c in plain.device_classes(IDENTITY, {"x": "1"})] == ["npu.example.com"]


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--backend npu`` loads :class:`ProfileBackend`, as an installed entry point would."""

    def load(name: str, plugins: bool = True) -> Hooks:
        return from_objects(name, ProfileBackend())

    monkeypatch.setattr(dra_core.plugins, "load", load)
    monkeypatch.delenv("NPU_PROFILES", raising=False)


def rendered(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["render", "--backend", "npu", *args]) == 0
    return [c["metadata"]["name"] for c in yaml.safe_load_all(capsys.readouterr().out)]


@pytest.mark.usefixtures("npu")
def test_render_passes_the_flag_and_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rendered(capsys) == ["full.npu.example.com"]
    assert rendered(capsys, "--profiles", "half") == ["half.npu.example.com"]
    monkeypatch.setenv("NPU_PROFILES", "quarter")
    assert rendered(capsys) == ["quarter.npu.example.com"]

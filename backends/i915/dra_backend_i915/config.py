"""Configuration: the opaque per-claim config and the node settings, decoded strictly.

Opaque config (in a DeviceClass or ResourceClaim, ``opaque.driver: gpu.intel.com``)::

    {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig", "vfProfile": "flex170_m4"}

``vfProfile`` states which VF profile a claim expects; a VF allocated from a PF published with
another profile is refused at the node instead of silently handing out a different size.

Node settings come from the backend's options (``--vf-profile``, ``--shared-gpus``, which win)
and from its section of the agent's configuration file::

    vfProfiles: {flex170: flex170_m4, max_48g: none}
    sharedGpus: all | none | ["0000:03:00.0", "0x56a0"]
    vfTimeoutSeconds: 10

Unknown fields and wrong types are errors naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dra_backend_i915.profiles import PROFILES, ProfileError, parse_overrides
from dra_core import describe_validation_error

__all__ = (
    "API_VERSION",
    "BackendSettings",
    "GpuConfig",
    "NodeSettings",
    "SharedSelection",
    "decode_opaque",
    "parse_shared",
    "settings_from",
)

API_VERSION = "gpu.intel.com/v1alpha1"


class GpuConfig(BaseModel):
    """The opaque configuration of a claim or class for ``gpu.intel.com``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)

    api_version: Literal["gpu.intel.com/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GpuConfig"]
    vf_profile: str | None = Field(default=None, alias="vfProfile")

    @field_validator("vf_profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        if value is not None and value not in PROFILES:
            msg = f"unknown VF profile {value!r}; known: {', '.join(PROFILES)}"
            raise ValueError(msg)
        return value


def decode_opaque(parameters: Mapping[str, Any]) -> GpuConfig:
    """Decode one opaque config; ``ValueError`` naming every bad field."""
    if not isinstance(parameters, Mapping):
        msg = f"invalid GpuConfig: expected a JSON object, got {type(parameters).__name__}"
        raise ValueError(msg)
    try:
        return GpuConfig.model_validate(dict(parameters))
    except ValidationError as exc:
        raise ValueError(
            describe_validation_error(exc, f"GpuConfig (apiVersion {API_VERSION})")
        ) from None


class BackendSettings(BaseModel):
    """The backend's section of the agent's configuration file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    vf_profiles: dict[str, str] = Field(default_factory=dict, alias="vfProfiles")
    shared_gpus: str | list[str] = Field(default="none", alias="sharedGpus")
    vf_timeout_seconds: float | int = Field(default=10, alias="vfTimeoutSeconds", gt=0, le=45)


@dataclass(frozen=True)
class SharedSelection:
    """Which GPUs are shared: all, or those at these PCI addresses or with these PCI IDs."""

    all: bool = False
    addresses: frozenset[str] = frozenset()
    pci_ids: frozenset[str] = frozenset()

    def selects(self, address: str, pci_id: str) -> bool:
        """Whether the GPU at ``address`` with ID ``pci_id`` (``0x56a0``) is shared."""
        return self.all or address in self.addresses or pci_id in self.pci_ids


def parse_shared(value: str | list[str] | None) -> SharedSelection:
    """``none``, ``all``, or PCI addresses / PCI IDs (comma list or YAML list)."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    items = [i.strip().lower() for i in items if i.strip()]
    if not items or items == ["none"]:
        return SharedSelection()
    if items == ["all"]:
        return SharedSelection(all=True)
    addresses, ids = set(), set()
    for item in items:
        if item.startswith("0x") and len(item) == 6:
            ids.add(item)
        elif len(item) == 12 and item[4] == ":" and item[7] == ":" and item[10] == ".":
            addresses.add(item)
        else:
            msg = (
                f"shared GPUs: {item!r} is not none, all, a PCI address (0000:03:00.0) "
                f"or a PCI ID (0x56a0)"
            )
            raise ValueError(msg)
    return SharedSelection(addresses=frozenset(addresses), pci_ids=frozenset(ids))


@dataclass(frozen=True)
class NodeSettings:
    """Everything the backend needs to know about this node, from options and config."""

    sysfs_root: Path = Path("/sys")
    devfs_root: Path = Path("/dev")
    vf_profiles: Mapping[str, str] = field(default_factory=dict)
    shared: SharedSelection = SharedSelection()
    vf_timeout: float = 10.0


def _option(options: Mapping[str, str | None], name: str) -> str | None:
    """An option by its name with dashes (``sysfs-root``) or underscores (``sysfs_root``)."""
    value = options.get(name.replace("-", "_"))
    return value if value is not None else options.get(name)


def settings_from(options: Mapping[str, str | None], config: Mapping[str, Any]) -> NodeSettings:
    """Merge the config section and the options (options win); ``ValueError`` on bad input.

    Option keys are accepted with underscores (as the hookspec documents) or dashes.
    """
    try:
        section = BackendSettings.model_validate(dict(config or {}))
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, "i915 backend configuration")) from None
    try:
        profiles = parse_overrides(",".join(f"{k}={v}" for k, v in section.vf_profiles.items()))
        profiles.update(parse_overrides(_option(options, "vf-profile")))
    except ProfileError as exc:
        raise ValueError(str(exc)) from None
    shared_option = _option(options, "shared-gpus")
    shared = parse_shared(shared_option if shared_option else section.shared_gpus)
    return NodeSettings(
        sysfs_root=Path(_option(options, "sysfs-root") or "/sys"),
        devfs_root=Path(_option(options, "devfs-root") or "/dev"),
        vf_profiles=profiles,
        shared=shared,
        vf_timeout=float(section.vf_timeout_seconds),
    )

"""Kubernetes releases the project supports and the DRA feature gates of each.

One table serves `dra-core render` (which DeviceClasses a release's API server accepts) and the
test harness (which ``--feature-gates`` a release's binaries start with).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = (
    "DRA_GATE_DEFAULTS",
    "SUPPORTED_MINORS",
    "ReleaseError",
    "all_mode_over_counters_crashes_scheduler",
    "counter_sets_beside_devices",
    "default_on_since",
    "gate_defaults",
    "gates_on",
    "k8s_minor",
    "parse_feature_gates",
    "shared_devices_first",
    "taints_per_device",
)

#: Names the gates a DeviceClass needs, on the class itself (comma-separated); the chart and
#: the conformance suite read it.
GATES_ANNOTATION = "dra-core.dev/feature-gates"
#: Oldest and newest minor releases whose feature gates are known here.
SUPPORTED_MINORS = range(34, 38)

#: The DRA feature gates the project uses, and their defaults in each minor release
#: (pkg/features/kube_features.go of v1.34.4, v1.35.4, v1.36.3, v1.37.2). ResourceHealthStatus
#: is the kubelet's device health in the pod status (the API server drops it with the gate off).
#: A gate missing from a release's map does not exist there: naming it on a command line makes
#: every binary of that release refuse to start.
DRA_GATE_DEFAULTS: dict[int, dict[str, bool]] = {
    34: {
        "DRAPartitionableDevices": False,  # alpha
        "DRAConsumableCapacity": False,  # alpha
        "DRADeviceTaints": False,  # alpha; its DeviceTaintRule API is resource.k8s.io/v1alpha3
        "DRADeviceBindingConditions": False,  # alpha
        "DRAPrioritizedList": True,  # beta
        "DRAResourceClaimDeviceStatus": True,  # beta
        "ResourceHealthStatus": False,  # alpha; device health in the pod status
    },
    35: {
        "DRAPartitionableDevices": False,  # alpha
        "DRAConsumableCapacity": False,  # alpha
        "DRADeviceTaints": False,  # alpha
        "DRADeviceTaintRules": False,  # alpha, resource.k8s.io/v1alpha3
        "DRADeviceBindingConditions": False,  # alpha
        "DRAPrioritizedList": True,  # beta
        "DRAResourceClaimDeviceStatus": True,  # beta
        "ResourceHealthStatus": False,  # alpha
    },
    36: {
        "DRAPartitionableDevices": True,  # beta
        "DRAConsumableCapacity": True,  # beta
        "DRADeviceTaints": True,  # beta
        "DRADeviceTaintRules": False,  # beta, resource.k8s.io/v1beta2
        "DRADeviceBindingConditions": True,  # beta
        "DRAPrioritizedList": True,  # GA
        "DRAResourceClaimDeviceStatus": True,  # beta
        "ResourceHealthStatus": True,  # beta
    },
    37: {
        "DRAPartitionableDevices": True,  # beta
        "DRAConsumableCapacity": True,  # beta
        "DRADeviceTaints": True,  # GA, not locked
        "DRADeviceTaintRules": True,  # GA
        "DRADeviceBindingConditions": True,  # beta
        "DRAPrioritizedList": True,  # GA, locked to true (setting true is fine)
        "DRAResourceClaimDeviceStatus": True,  # GA, locked to true
        "ResourceHealthStatus": True,  # beta
    },
}

#: Releases whose API server wants a counter set in the ResourceSlice of the devices consuming
#: it (DRAPartitionableDevices' first design); from 1.35 counter sets go in slices of their own.
_COUNTER_SETS_BESIDE_DEVICES = frozenset({34})
#: Taints per device where fewer than 16 (k8s.io/api resource/v1 DeviceTaintsMaxLength).
_TAINTS_PER_DEVICE = {34: 4}
#: Releases whose scheduler checks a request's capacity against the device at the request's
#: device index in the chosen device's slice, not the chosen device (1.34.4's allocator,
#: ``CmpRequestOverCapacity(..., device.slice, r.deviceIndex)``; fixed in 1.35): a share of a
#: shared device is allocated only when the device is the first of its slice.
_SHARES_CHECKED_AGAINST_FIRST_DEVICE = frozenset({34})
#: Releases whose scheduler crashes (a nil pointer in its allocator's counter check, seen with
#: 1.35.4) on a claim with ``allocationMode: All`` that can select a device consuming counters,
#: with DRAPartitionableDevices on: the "All" path builds its devices without their pool
#: (``checkAvailableCounters`` reads ``device.pool``); 1.36 sets it.
_ALL_MODE_OVER_COUNTERS_CRASHES_SCHEDULER = frozenset({35})

# v1.34.4, 1.34, v1.36.0-gke.1200 (a provider's build), 1.36+ (a provider's minor).
_VERSION = re.compile(r"v?1\.(\d+)\+?(\.\d+)?([-+].*)?")


class ReleaseError(ValueError):
    """A Kubernetes version or feature-gate list that cannot be used; the message says why."""


def k8s_minor(version: str) -> int:
    """The minor release of ``version`` (``v1.34.4`` -> 34), which must be 1.34 or later."""
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        msg = f"{version!r} is not a Kubernetes release like v1.34.4"
        raise ReleaseError(msg)
    minor = int(match.group(1))
    if minor < SUPPORTED_MINORS[0]:
        msg = (
            f"Kubernetes {version}: dra-core needs 1.{SUPPORTED_MINORS[0]} or later "
            "(resource.k8s.io/v1)"
        )
        raise ReleaseError(msg)
    return minor


def gate_defaults(version: str) -> dict[str, bool]:
    """The DRA gates of ``version`` with their defaults. A release newer than the table's
    newest gets the newest's: a gate, once on by default, stays on."""
    minor = min(k8s_minor(version), SUPPORTED_MINORS[-1])
    return dict(DRA_GATE_DEFAULTS[minor])


def counter_sets_beside_devices(version: str) -> bool:
    """Whether an API server of ``version`` wants counter sets beside their devices (1.34)."""
    return k8s_minor(version) in _COUNTER_SETS_BESIDE_DEVICES


def shared_devices_first(version: str) -> bool:
    """Whether each shared device must be the first of its slice for the scheduler of
    ``version`` to allocate shares of it (1.34)."""
    return k8s_minor(version) in _SHARES_CHECKED_AGAINST_FIRST_DEVICE


def all_mode_over_counters_crashes_scheduler(version: str) -> bool:
    """Whether the scheduler of ``version`` crashes on an ``allocationMode: All`` claim that
    can select a device consuming counters, when DRAPartitionableDevices is on (1.35)."""
    return k8s_minor(version) in _ALL_MODE_OVER_COUNTERS_CRASHES_SCHEDULER


def taints_per_device(version: str) -> int | None:
    """The most taints an API server of ``version`` accepts on one device where that is fewer
    than `dra_core.model.LIMITS` allows (4 in 1.34), else None."""
    return _TAINTS_PER_DEVICE.get(k8s_minor(version))


def default_on_since(gate: str) -> int | None:
    """The first minor release with ``gate`` on by default, if any."""
    return next((m for m in SUPPORTED_MINORS if DRA_GATE_DEFAULTS[m].get(gate)), None)


def parse_feature_gates(text: str) -> dict[str, bool]:
    """``A=true,B=false`` (an API server's ``--feature-gates``) as a dict."""
    gates: dict[str, bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or value.strip().lower() not in ("true", "false"):
            msg = f"feature gate {item!r}: write NAME=true or NAME=false"
            raise ReleaseError(msg)
        gates[name.strip()] = value.strip().lower() == "true"
    return gates


def gates_on(version: str, overrides: Mapping[str, bool] | None = None) -> dict[str, bool]:
    """Which DRA gates are on in an API server of ``version`` started with ``overrides``.

    Gates the project does not use are ignored, so a cluster's whole ``--feature-gates`` can be
    given; turning on a DRA gate the release does not have is an error.
    """
    gates = gate_defaults(version)
    known_anywhere = {gate for release in DRA_GATE_DEFAULTS.values() for gate in release}
    for gate, enabled in (overrides or {}).items():
        if gate not in known_anywhere:
            continue
        if gate not in gates:
            if enabled:
                msg = f"feature gate {gate} does not exist in Kubernetes {version}"
                raise ReleaseError(msg)
            continue
        gates[gate] = enabled
    return gates

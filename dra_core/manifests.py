"""Kubernetes manifests rendered from a backend's declarations (``dra-core render``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dra_core.model import DeviceClassSpec
from dra_core.releases import GATES_ANNOTATION

__all__ = (
    "CEL_FIELD_GATES",
    "GATES_ANNOTATION",
    "LeftOut",
    "device_class_manifests",
    "required_gates",
    "select_classes",
)

#: The fields of the CEL ``device`` variable that the API server compiles only with a feature
#: gate on (k8s.io/dynamic-resource-allocation/cel, ``Features``); with it off a DeviceClass
#: using one is refused: ``undefined field 'allowMultipleAllocations'``.
CEL_FIELD_GATES: Mapping[str, str] = {"allowMultipleAllocations": "DRAConsumableCapacity"}

_DEVICE_FIELD = re.compile(r"\bdevice\s*\.\s*([A-Za-z_]\w*)")


@dataclass(frozen=True)
class LeftOut:
    """A class the target API server would refuse, and the gates that are off for it."""

    spec: DeviceClassSpec
    gates: tuple[str, ...]


def required_gates(spec: DeviceClassSpec) -> tuple[str, ...]:
    """The feature gates the API server needs on to compile ``spec``'s selectors, derived from
    the ``device`` fields they use."""
    fields = {f for expression in spec.selectors for f in _DEVICE_FIELD.findall(expression)}
    return tuple(sorted({CEL_FIELD_GATES[f] for f in fields if f in CEL_FIELD_GATES}))


def select_classes(
    classes: Iterable[DeviceClassSpec], gates: Mapping[str, bool]
) -> tuple[list[DeviceClassSpec], list[LeftOut]]:
    """The classes an API server with ``gates`` on accepts (a gate not named is off), and the
    ones it refuses with the gates they need."""
    kept: list[DeviceClassSpec] = []
    left_out: list[LeftOut] = []
    for spec in classes:
        off = tuple(g for g in required_gates(spec) if not gates.get(g, False))
        if off:
            left_out.append(LeftOut(spec, off))
        else:
            kept.append(spec)
    return kept, left_out


def device_class_manifests(
    classes: Sequence[DeviceClassSpec], gates: Mapping[str, bool] | None = None
) -> list[dict[str, Any]]:
    """``resource.k8s.io/v1`` DeviceClass objects for the backend's classes; with ``gates``
    (which feature gates the API server has on) only those it accepts."""
    if gates is not None:
        classes, _ = select_classes(classes, gates)
    manifests = []
    for spec in classes:
        body: dict[str, Any] = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": spec.name},
            "spec": {"selectors": [{"cel": {"expression": e}} for e in spec.selectors]},
        }
        annotations = {}
        if spec.description:
            annotations["dra-core.dev/description"] = spec.description
        needs = required_gates(spec)
        if needs:
            annotations[GATES_ANNOTATION] = ",".join(needs)
        if annotations:
            body["metadata"]["annotations"] = annotations
        if spec.config is not None:
            body["spec"]["config"] = [{"opaque": dict(spec.config)}]
        manifests.append(body)
    return manifests

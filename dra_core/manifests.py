"""Kubernetes manifests rendered from a backend's declarations (``dra-core render``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dra_core.model import DeviceClassSpec

__all__ = ("device_class_manifests",)


def device_class_manifests(classes: Sequence[DeviceClassSpec]) -> list[dict[str, Any]]:
    """``resource.k8s.io/v1`` DeviceClass objects for the backend's classes."""
    manifests = []
    for spec in classes:
        body: dict[str, Any] = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": spec.name},
            "spec": {"selectors": [{"cel": {"expression": e}} for e in spec.selectors]},
        }
        if spec.description:
            body["metadata"]["annotations"] = {"dra-core.dev/description": spec.description}
        if spec.config is not None:
            body["spec"]["config"] = [{"opaque": dict(spec.config)}]
        manifests.append(body)
    return manifests

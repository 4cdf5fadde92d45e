"""Every object in examples/ is accepted by the real API server (fields, CEL selectors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

EXAMPLES = Path(__file__).parent.parent / "examples"
KUBERNETES_APIS = {"v1", "resource.k8s.io/v1"}


def objects(path: Path) -> list[dict]:
    """The Kubernetes objects of a file (backend inventories and control files are not)."""
    return [
        d
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict) and d.get("apiVersion") in KUBERNETES_APIS
    ]


FILES = sorted(p for p in EXAMPLES.glob("*/*.yaml") if objects(p))
PATHS = {
    "ResourceClaimTemplate": f"{helpers.RESOURCE_API}/namespaces/{{ns}}/resourceclaimtemplates",
    "ResourceClaim": f"{helpers.RESOURCE_API}/namespaces/{{ns}}/resourceclaims",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
}


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_is_accepted(path, kube_api, namespace):
    for body in objects(path):
        kind = body["kind"]
        assert kind in PATHS, f"{path}: no test path for kind {kind}"
        created = helpers.create(
            kube_api, PATHS[kind].format(ns=namespace), body, query={"dryRun": "All"}
        )
        assert created["metadata"]["name"] == body["metadata"]["name"]


def test_every_example_directory_is_covered():
    assert {p.parent.name for p in FILES} >= {"fake", "i915"}

"""Every object in examples/ is accepted by the real API server (fields, CEL selectors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dra_core.testing.conformance import KUBERNETES_APIS, check_example
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

EXAMPLES = Path(__file__).parent.parent / "examples"
ADMIN_ACCESS_LABEL = "resource.kubernetes.io/admin-access"


def objects(path: Path) -> list[dict]:
    """The Kubernetes objects of a file (backend inventories and control files are not)."""
    return [
        d
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict) and d.get("apiVersion") in KUBERNETES_APIS
    ]


FILES = sorted(p for p in EXAMPLES.glob("*/*.yaml") if objects(p))


def own_namespace(path: Path, bodies: list[dict]) -> dict | None:
    """The Namespace a file brings for its other objects (e.g. one labelled for admin access)."""
    namespaces = [b for b in bodies if b["kind"] == "Namespace"]
    assert len(namespaces) <= 1, f"{path}: one Namespace per example at most"
    if not namespaces:
        return None
    name = namespaces[0]["metadata"]["name"]
    for body in bodies:
        if body["kind"] != "Namespace":
            assert body["metadata"].get("namespace") == name, (
                f"{path}: {body['kind']} {body['metadata']['name']} is not in the file's "
                f"namespace {name}, so `kubectl apply -f` would put it elsewhere"
            )
    return namespaces[0]


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_is_accepted(path, dra_kube_client, namespace):
    own_namespace(path, objects(path))  # every object in the file's own Namespace, if any
    check_example(dra_kube_client, path, namespace)


def test_admin_access_needs_the_labelled_namespace(kube_api, namespace):
    from kubernetes.client.exceptions import ApiException

    path = EXAMPLES / "i915" / "monitoring-daemonset.yaml"
    bodies = objects(path)
    assert own_namespace(path, bodies)["metadata"]["labels"] == {ADMIN_ACCESS_LABEL: "true"}
    (template,) = [b for b in bodies if b["kind"] == "ResourceClaimTemplate"]
    template = {**template, "metadata": {**template["metadata"], "namespace": namespace}}
    with pytest.raises(ApiException) as refused:
        helpers.create(
            kube_api,
            f"{helpers.RESOURCE_API}/namespaces/{namespace}/resourceclaimtemplates",
            template,
            query={"dryRun": "All"},
        )
    assert refused.value.status in (403, 422), refused.value.body
    assert ADMIN_ACCESS_LABEL in refused.value.body


def test_every_example_directory_is_covered():
    assert {p.parent.name for p in FILES} >= {"fake", "i915"}

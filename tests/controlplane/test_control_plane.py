"""Prove the test control plane is real: API validation of ResourceSlices and DRA scheduling."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from dra_core.releases import gates_on
from dra_core.testing.controlplane import selected_k8s_version
from tests.controlplane import helpers as h

pytestmark = pytest.mark.controlplane

DRIVER = h.TEST_DRIVER


@pytest.fixture
def device_class(kube_api):
    name = h.unique_name("class")
    h.create_device_class(kube_api, name, DRIVER)
    yield name
    h.delete_device_class(kube_api, name)


def _devices(n, prefix="dev"):
    return [
        h.device(f"{prefix}-{i}", attributes={"model": "x", "index": i}, capacity={"memory": "1Gi"})
        for i in range(n)
    ]


def test_server_reports_pinned_version(control_plane, kube_api):
    """The API server is the release the harness was asked for (DRA_K8S_VERSION)."""
    v = h.get(kube_api, "/version")
    assert v["gitVersion"] == control_plane.k8s_version == selected_k8s_version(), v
    groups = h.get(kube_api, "/apis/resource.k8s.io")
    assert "v1" in [x["version"] for x in groups["versions"]], groups


def test_the_api_server_has_the_gates_the_harness_chose(control_plane):
    """The release's gate table (dra_core.releases) is what the running server reports: its
    defaults, with the gate set's choices over them."""
    expected = gates_on(control_plane.k8s_version, control_plane.feature_gates)
    enabled = control_plane.enabled_gates()
    assert {gate: enabled.get(gate) for gate in expected} == expected
    assert control_plane.missing_gates(*expected) == [g for g, on in expected.items() if not on]


def test_valid_resource_slice_is_accepted(kube_api, dra_ready_node):
    name = h.unique_name("slice")
    body = h.resource_slice_body(name, dra_ready_node, _devices(128))
    created = h.create_resource_slice(kube_api, body)
    try:
        assert created["spec"]["driver"] == DRIVER
        assert len(created["spec"]["devices"]) == 128
        dev = created["spec"]["devices"][0]
        assert dev["attributes"]["model"] == {"string": "x"}
        assert dev["capacity"]["memory"] == {"value": "1Gi"}
    finally:
        h.delete_resource_slice(kube_api, name)


@pytest.mark.parametrize(
    "case,devices,expect",
    [
        ("too-many-devices", _devices(129), "spec.devices"),
        (
            "bad-device-name",
            [h.device("Bad_Name", attributes={"model": "x"})],
            "spec.devices[0].name",
        ),
    ],
)
def test_invalid_resource_slice_is_rejected(kube_api, dra_ready_node, case, devices, expect):
    body = h.resource_slice_body(h.unique_name("slice"), dra_ready_node, devices)
    with pytest.raises(ApiException) as exc:
        h.create_resource_slice(kube_api, body)
    assert exc.value.status == 422, exc.value.body
    assert expect in exc.value.body, exc.value.body


def test_scheduler_allocates_claim_and_binds_pod(kube_api, namespace, dra_ready_node, device_class):
    slice_name = h.unique_name("slice")
    h.create_resource_slice(
        kube_api, h.resource_slice_body(slice_name, dra_ready_node, _devices(2))
    )
    try:
        h.create_resource_claim(kube_api, namespace, h.resource_claim_body("claim1", device_class))
        h.create_pod(
            kube_api,
            namespace,
            h.pod_body("pod1", [{"name": "dev", "resourceClaimName": "claim1"}]),
        )
        pod = h.wait_for_pod_scheduled(kube_api, namespace, "pod1", timeout=60)
        assert pod["spec"]["nodeName"] == dra_ready_node

        claim = h.wait_for_claim_allocated(kube_api, namespace, "claim1", timeout=30)
        results = claim["status"]["allocation"]["devices"]["results"]
        assert len(results) == 1, results
        r = results[0]
        assert r["driver"] == DRIVER
        assert r["pool"] == dra_ready_node
        assert r["device"] in ("dev-0", "dev-1")
        assert r["request"] == "req"
        reserved = claim["status"].get("reservedFor", [])
        assert [x["name"] for x in reserved] == ["pod1"], reserved
        # The allocation pins the claim to the fake node.
        terms = claim["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"]
        assert dra_ready_node in str(terms)
    finally:
        h.delete_pod(kube_api, namespace, "pod1")
        h.delete_resource_slice(kube_api, slice_name)


def test_claim_template_creates_claim_for_pod(kube_api, namespace, dra_ready_node, device_class):
    """The resourceclaim controller (kube-controller-manager) turns a template into a claim."""
    slice_name = h.unique_name("slice")
    h.create_resource_slice(
        kube_api, h.resource_slice_body(slice_name, dra_ready_node, _devices(1))
    )
    try:
        spec = h.resource_claim_body("unused", device_class)["spec"]
        h.create_resource_claim_template(kube_api, namespace, "tmpl", spec)
        h.create_pod(
            kube_api,
            namespace,
            h.pod_body("pod2", [{"name": "dev", "resourceClaimTemplateName": "tmpl"}]),
        )
        pod = h.wait_for_pod_scheduled(kube_api, namespace, "pod2", timeout=60)
        assert pod["spec"]["nodeName"] == dra_ready_node
        statuses = pod["status"].get("resourceClaimStatuses", [])
        assert len(statuses) == 1 and statuses[0].get("resourceClaimName"), statuses
        claim = h.wait_for_claim_allocated(
            kube_api, namespace, statuses[0]["resourceClaimName"], timeout=30
        )
        assert claim["status"]["allocation"]["devices"]["results"][0]["device"] == "dev-0"
    finally:
        h.delete_pod(kube_api, namespace, "pod2")
        h.delete_resource_slice(kube_api, slice_name)

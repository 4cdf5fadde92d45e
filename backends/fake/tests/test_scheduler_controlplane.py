"""The fake backend's published model on the real API server and scheduler: the default
inventory is accepted, partitions and the whole device exclude each other through the counter
set, and shares of the shared device get share IDs and rounded consumed capacity.

Uses the session control plane of dra-core's pytest plugin (``dra_control_plane``); each test
needs its feature's gate on there. A driver name of its own keeps its devices away from other
tests' pods.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import dra_backend_fake.plugin
import pytest
from dra_backend_fake.inventory import build, default_specs

from dra_core.manifests import device_class_manifests
from dra_core.plugins import from_objects
from dra_core.slices.build import build_slices
from dra_core.slices.features import release_features, safe_inventory
from dra_core.testing.scenario import create_ready_node

pytestmark = pytest.mark.controlplane

DRIVER = "sched.fake.dra-core.dev"
RESOURCE_API = "/apis/resource.k8s.io/v1"


@pytest.fixture(scope="module")
def api(dra_control_plane):
    client = dra_control_plane.api_client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def h():
    from tests.controlplane import helpers

    return helpers


@pytest.fixture(scope="module")
def node(dra_control_plane, dra_kube_client, api, h):
    """A node publishing the default fake inventory under DRIVER, with the backend's classes."""
    name = f"fake-sched-{uuid.uuid4().hex[:6]}"
    create_ready_node(dra_kube_client, name)
    hooks = from_objects("fake", dra_backend_fake.plugin.FakePlugin)
    identity = replace(hooks.backend_identity(), driver_name=DRIVER)
    # Only the classes the release accepts (shared.* needs DRAConsumableCapacity).
    classes = device_class_manifests(
        hooks.device_classes(identity), dra_control_plane.enabled_gates()
    )
    # What the agent would publish there: the release's counter layout, without the devices
    # a gate that is off leaves out.
    server = release_features(dra_control_plane.k8s_version, dra_control_plane.enabled_gates())
    inventory, _ = safe_inventory(build(default_specs()), server)
    slices = build_slices(DRIVER, name, name, inventory, 1, **server.layout)
    for body in classes:
        h.create(api, f"{RESOURCE_API}/deviceclasses", body)
    for body in slices:
        h.create(api, f"{RESOURCE_API}/resourceslices", body)  # the real API server accepts them
    yield name
    for body in slices:
        h.delete(api, f"{RESOURCE_API}/resourceslices/{body['metadata']['name']}")
    for body in classes:
        h.delete(api, f"{RESOURCE_API}/deviceclasses/{body['metadata']['name']}")
    h.delete_node(api, name)


@pytest.fixture
def namespace(api, h):
    name = h.create_namespace(api, h.unique_name("fake-sched"))
    h.wait_for_default_service_account(api, name)
    yield name
    h.delete_namespace(api, name)


def _claim(name: str, exactly: dict) -> dict:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "req", "exactly": exactly}]}},
    }


def _run(api, h, namespace, node, name, exactly):
    """Create a claim and a pod using it, pinned to ``node`` by node affinity."""
    h.create_resource_claim(api, namespace, _claim(name, exactly))
    pod = h.pod_body(name, [{"name": "dev", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    h.create_pod(api, namespace, pod)


def _results(api, h, namespace, name):
    claim = h.wait_for_claim_allocated(api, namespace, name, timeout=60)
    return claim["status"]["allocation"]["devices"]["results"]


def _stays_pending(api, h, namespace, name, seconds=4.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not h.get_pod(api, namespace, name)["spec"].get("nodeName"), f"{name} scheduled"
        time.sleep(0.5)
    claim = h.get_resource_claim(api, namespace, name)
    assert not claim.get("status", {}).get("allocation"), f"{name} allocated"


@pytest.mark.requires_feature("DRAPartitionableDevices")
def test_partitions_and_whole_device_exclude_each_other(api, h, namespace, node):
    _run(
        api,
        h,
        namespace,
        node,
        "parts",
        {
            "deviceClassName": f"partition.{DRIVER}",
            "allocationMode": "ExactCount",
            "count": 3,
        },
    )
    results = _results(api, h, namespace, "parts")
    assert sorted(r["device"] for r in results) == ["big-0-p0", "big-0-p1", "big-0-p2"]
    assert all(r["pool"] == node and r["driver"] == DRIVER for r in results)
    # big-0 is free as a device, but its counter set has one partition's worth left.
    whole = (
        f'device.attributes["{DRIVER}"].model == "fake-partitionable" && '
        f'device.attributes["{DRIVER}"].type == "device"'
    )
    _run(
        api,
        h,
        namespace,
        node,
        "whole",
        {
            "deviceClassName": DRIVER,
            "selectors": [{"cel": {"expression": whole}}],
        },
    )
    _stays_pending(api, h, namespace, "whole")
    _run(api, h, namespace, node, "last", {"deviceClassName": f"partition.{DRIVER}"})
    assert [r["device"] for r in _results(api, h, namespace, "last")] == ["big-0-p3"]


@pytest.mark.requires_feature("DRAConsumableCapacity")
def test_shares_of_the_shared_device(api, h, namespace, node):
    for name in ("share-a", "share-b"):
        _run(
            api,
            h,
            namespace,
            node,
            name,
            {
                "deviceClassName": f"shared.{DRIVER}",
                "capacity": {"requests": {"memory": "1800Mi", "millicores": "250"}},
            },
        )
    shares = [_results(api, h, namespace, n) for n in ("share-a", "share-b")]
    for (result,) in shares:
        assert result["device"] == "shared-0"
        uuid.UUID(result["shareID"])
        # Rounded up by the request policies: 512Mi + k*512Mi, 100 + k*100.
        assert result["consumedCapacity"] == {"memory": "2Gi", "millicores": "300"}
    assert shares[0][0]["shareID"] != shares[1][0]["shareID"]
    # 2Gi + 2Gi used of 8Gi: 5Gi more does not fit.
    _run(
        api,
        h,
        namespace,
        node,
        "share-big",
        {
            "deviceClassName": f"shared.{DRIVER}",
            "capacity": {"requests": {"memory": "5Gi", "millicores": "100"}},
        },
    )
    _stays_pending(api, h, namespace, "share-big")

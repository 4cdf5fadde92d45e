"""deploy/ against the real API server: RBAC and the own-node ValidatingAdmissionPolicy are
enforced for a pod-bound service-account token (the node, the driver and the pool name of every
slice the agent writes or removes), and every object passes a server-side dry run.

The base's objects are applied as they are (namespace ``dra-core``, cluster-wide RBAC and
policy) and removed at the end of the module.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dra_core.manifests import GATES_ANNOTATION
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers as h
from tests.deploy import kustomize
from tests.deploy.test_policy_driver import policy_driver

pytestmark = pytest.mark.controlplane

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SLICES = f"{h.RESOURCE_API}/resourceslices"
#: The driver the base's agent ServiceAccount is for (the fake backend's).
DRIVER = policy_driver(kustomize.build(DEPLOY / "base"))
OTHER_DRIVER = "vap.dra-core.example.com"

_PLURALS = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    "DaemonSet": "daemonsets",
    "DeviceClass": "deviceclasses",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
}


def collection_path(obj: dict[str, Any]) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = obj["metadata"].get("namespace")
    scope = f"/namespaces/{ns}" if ns else ""
    return f"{prefix}{scope}/{_PLURALS[kind]}"


def object_path(obj: dict[str, Any]) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


def apply(api, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply (works whether or not the object exists)."""
    query = {"fieldManager": "dra-core-tests", "force": "true"}
    if dry_run:
        query["dryRun"] = "All"
    return h.request(
        api,
        "PATCH",
        object_path(obj),
        obj,
        query=query,
        content_type="application/apply-patch+yaml",
    )


def bearer_client(control_plane, token: str) -> client.ApiClient:
    cfg = control_plane.client_configuration()
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(cfg)


def denied(fn, *args, **kw) -> ApiException:
    with pytest.raises(ApiException) as info:
        fn(*args, **kw)
    assert info.value.status == 403, info.value.body
    return info.value


def slice_body(
    name: str, node: str | None, *, driver: str = DRIVER, pool: str | None = None
) -> dict[str, Any]:
    """A slice of ``driver`` on ``node`` in pool ``pool`` (default: the node's name), or a
    cluster-wide one when ``node`` is None."""
    body = h.resource_slice_body(
        name, node or "unused", [h.device("dev-0")], driver=driver, pool=pool
    )
    if node is None:  # a cluster-wide slice
        del body["spec"]["nodeName"]
        body["spec"]["allNodes"] = True
        body["spec"]["pool"]["name"] = "cluster"
    return body


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_objects() -> list[dict[str, Any]]:
    return kustomize.build(DEPLOY / "base")


@pytest.fixture(scope="module")
def installed(kube_api, base_objects):
    """Namespace, ServiceAccount, RBAC and the policy of deploy/base, applied for real."""
    applied = [o for o in base_objects if o["kind"] != "DaemonSet"]
    for obj in applied:
        apply(kube_api, obj)
    try:
        yield {o["kind"]: o for o in applied}
    finally:
        for obj in reversed(applied):
            with contextlib.suppress(ApiException):
                h.delete(kube_api, object_path(obj))


@pytest.fixture(scope="module")
def nodes(kube_api, dra_kube_client, installed):
    names = [h.unique_name("node-a"), h.unique_name("node-b")]
    for name in names:
        # Tainted not-ready: the scheduler never puts another test's pod on them.
        create_ready_node(dra_kube_client, name, untaint=False)
    yield names
    for name in names:
        h.delete_node(kube_api, name)


@pytest.fixture(scope="module")
def agent_pod(kube_api, installed, nodes):
    """A pod of the agent's ServiceAccount on node A (no kubelet needed: it stays Pending)."""
    sa = installed["ServiceAccount"]["metadata"]
    body = h.pod_body(h.unique_name("agent"), node_name=nodes[0])
    body["spec"]["serviceAccountName"] = sa["name"]
    pod = h.create_pod(kube_api, sa["namespace"], body)
    yield pod
    h.delete_pod(kube_api, sa["namespace"], pod["metadata"]["name"])


def request_token(kube_api, sa_meta: dict[str, Any], pod: dict[str, Any] | None) -> str:
    spec: dict[str, Any] = {"audiences": [], "expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        }
    review = h.create(
        kube_api,
        f"/api/v1/namespaces/{sa_meta['namespace']}/serviceaccounts/{sa_meta['name']}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    return review["status"]["token"]


@pytest.fixture(scope="module")
def agent(control_plane, kube_api, installed, agent_pod):
    """An API client authenticated with a token bound to the agent pod on node A."""
    token = request_token(kube_api, installed["ServiceAccount"]["metadata"], agent_pod)
    api = bearer_client(control_plane, token)
    yield api
    api.close()


@pytest.fixture(scope="module")
def policy_active(kube_api, agent, nodes):
    """Wait until the policy is enforced (the admission plugin picks it up asynchronously)."""
    probe = slice_body(h.unique_name("probe"), nodes[1])

    def enforced() -> bool:
        try:
            h.create(agent, SLICES, probe, query={"dryRun": "All"})
        except ApiException as e:
            return e.status == 403 and "ValidatingAdmissionPolicy" in (e.body or "")
        return False

    h.wait_for(enforced, timeout=30, description="the ResourceSlice policy to be enforced")


@pytest.fixture
def slice_cleanup(kube_api):
    names: list[str] = []
    yield names
    for name in names:
        h.delete_resource_slice(kube_api, name)


# ------------------------------------------------------------------ tests
def test_pod_bound_token_carries_the_node_name(agent, installed, nodes):
    review = h.create(
        agent,
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    user = review["status"]["userInfo"]
    sa = installed["ServiceAccount"]["metadata"]
    assert user["username"] == f"system:serviceaccount:{sa['namespace']}:{sa['name']}"
    assert user["extra"][NODE_NAME_EXTRA] == [nodes[0]]


def test_agent_writes_its_own_nodes_slices(agent, nodes, policy_active, slice_cleanup):
    name = h.unique_name("own")
    slice_cleanup.append(name)
    created = h.create(agent, SLICES, slice_body(name, nodes[0]))
    assert created["spec"]["nodeName"] == nodes[0]
    updated = h.merge_patch(agent, f"{SLICES}/{name}", {"metadata": {"labels": {"x": "y"}}})
    assert updated["metadata"]["labels"] == {"x": "y"}
    whole = h.get(agent, f"{SLICES}/{name}")
    whole["spec"]["devices"].append(h.device("dev-1"))
    replaced = h.request(agent, "PUT", f"{SLICES}/{name}", whole)
    assert len(replaced["spec"]["devices"]) == 2
    listed = h.get(agent, SLICES, query={"fieldSelector": f"spec.nodeName={nodes[0]}"})
    assert [s["metadata"]["name"] for s in listed["items"]] == [name]
    h.delete(agent, f"{SLICES}/{name}", ignore_missing=False)


def test_agent_may_not_create_another_nodes_slice(agent, nodes, policy_active, slice_cleanup):
    name = h.unique_name("other")
    slice_cleanup.append(name)
    err = denied(h.create, agent, SLICES, slice_body(name, nodes[1]))
    assert "dra-core-resourceslices-own-node" in err.body
    assert f"the dra-core agent on node '{nodes[0]}' may only write ResourceSlices" in err.body
    assert f"not '{nodes[1]}'" in err.body


def test_agent_may_not_create_a_cluster_wide_slice(agent, policy_active, slice_cleanup):
    name = h.unique_name("cluster")
    slice_cleanup.append(name)
    err = denied(h.create, agent, SLICES, slice_body(name, None))
    assert "not slices without spec.nodeName" in err.body


def test_agent_may_not_update_or_delete_another_nodes_slice(
    kube_api, agent, nodes, policy_active, slice_cleanup
):
    name = h.unique_name("theirs")
    slice_cleanup.append(name)
    h.create(kube_api, SLICES, slice_body(name, nodes[1]))  # admins are not restricted
    path = f"{SLICES}/{name}"
    assert h.get(agent, path)["spec"]["nodeName"] == nodes[1]  # reading is allowed

    # An update fails on the new object already (first validation), whichever check says it.
    err = denied(h.merge_patch, agent, path, {"metadata": {"labels": {"x": "y"}}})
    assert "dra-core-resourceslices-own-node" in err.body
    assert f"the dra-core agent on node '{nodes[0]}' may only" in err.body
    assert f"not '{nodes[1]}'" in err.body
    whole = h.get(agent, path)
    whole["spec"]["devices"] = []
    denied(h.request, agent, "PUT", path, whole)
    err = denied(h.delete, agent, path, ignore_missing=False)
    assert f"may only change or delete ResourceSlices with spec.nodeName '{nodes[0]}'" in err.body
    assert h.get(kube_api, path)["spec"]["nodeName"] == nodes[1]  # still there


def test_agent_may_not_move_its_slice_to_another_node(agent, nodes, policy_active, slice_cleanup):
    """spec.nodeName is immutable (API validation, 422, runs before the policy); were it not,
    the policy's check of the new object would deny the move."""
    name = h.unique_name("move")
    slice_cleanup.append(name)
    h.create(agent, SLICES, slice_body(name, nodes[0]))
    with pytest.raises(ApiException) as info:
        h.merge_patch(agent, f"{SLICES}/{name}", {"spec": {"nodeName": nodes[1]}})
    assert info.value.status in (403, 422), info.value.body
    assert h.get(agent, f"{SLICES}/{name}")["spec"]["nodeName"] == nodes[0]


def test_agent_may_not_write_another_drivers_slices(
    kube_api, agent, nodes, policy_active, slice_cleanup
):
    name = h.unique_name("driver")
    slice_cleanup.append(name)
    err = denied(h.create, agent, SLICES, slice_body(name, nodes[0], driver=OTHER_DRIVER))
    assert "dra-core-resourceslices-own-node" in err.body
    assert (
        f"the dra-core agent for driver '{DRIVER}' may only write ResourceSlices of that "
        f"driver, not '{OTHER_DRIVER}'"
    ) in err.body

    # Another driver's slice on the agent's own node (written by that driver's agent, here an
    # admin): the agent may read it, but neither change nor delete it.
    h.create(kube_api, SLICES, slice_body(name, nodes[0], driver=OTHER_DRIVER))
    path = f"{SLICES}/{name}"
    assert h.get(agent, path)["spec"]["driver"] == OTHER_DRIVER
    err = denied(h.merge_patch, agent, path, {"metadata": {"labels": {"x": "y"}}})
    assert f"may only write ResourceSlices of that driver, not '{OTHER_DRIVER}'" in err.body
    err = denied(h.delete, agent, path, ignore_missing=False)
    assert (
        f"may only change or delete ResourceSlices of that driver in pool '{nodes[0]}', "
        f"not driver '{OTHER_DRIVER}' pool '{nodes[0]}'"
    ) in err.body
    assert h.get(kube_api, path)["spec"]["driver"] == OTHER_DRIVER  # still there


def test_agent_may_not_publish_under_another_nodes_pool_name(
    kube_api, agent, nodes, policy_active, slice_cleanup
):
    name = h.unique_name("pool")
    slice_cleanup.append(name)
    err = denied(h.create, agent, SLICES, slice_body(name, nodes[0], pool=nodes[1]))
    assert (
        f"the dra-core agent on node '{nodes[0]}' may only write ResourceSlices in its own "
        f"pool '{nodes[0]}', not pool '{nodes[1]}'"
    ) in err.body
    err = denied(h.create, agent, SLICES, slice_body(name, nodes[0], pool=f"{nodes[0]}/x"))
    assert f"not pool '{nodes[0]}/x'" in err.body

    # A slice on the agent's node that claims node B's pool (an admin wrote it): the agent
    # may not take it over, nor delete it.
    h.create(kube_api, SLICES, slice_body(name, nodes[0], pool=nodes[1]))
    path = f"{SLICES}/{name}"
    err = denied(h.merge_patch, agent, path, {"metadata": {"labels": {"x": "y"}}})
    assert f"not pool '{nodes[1]}'" in err.body
    err = denied(h.delete, agent, path, ignore_missing=False)
    assert f"not driver '{DRIVER}' pool '{nodes[1]}'" in err.body
    assert h.get(kube_api, path)["spec"]["pool"]["name"] == nodes[1]

    # Its own pool, its own driver, its own node: allowed (and the pool is the node's name,
    # which is what the agent publishes).
    own = h.unique_name("pool-own")
    slice_cleanup.append(own)
    assert h.create(agent, SLICES, slice_body(own, nodes[0]))["spec"]["pool"]["name"] == nodes[0]


def test_token_without_node_may_not_write_slices(
    control_plane, kube_api, installed, nodes, policy_active, slice_cleanup
):
    token = request_token(kube_api, installed["ServiceAccount"]["metadata"], None)
    api = bearer_client(control_plane, token)
    try:
        name = h.unique_name("nonode")
        slice_cleanup.append(name)
        err = denied(h.create, api, SLICES, slice_body(name, nodes[0]))
        assert "not bound to a pod on a node" in err.body
    finally:
        api.close()


def test_rbac_grants_what_the_agent_needs_and_nothing_else(agent, installed, nodes, namespace):
    # Granted.
    assert h.get(agent, f"/api/v1/nodes/{nodes[0]}")["metadata"]["name"] == nodes[0]
    with pytest.raises(ApiException) as missing:
        h.get(agent, f"{h.RESOURCE_API}/namespaces/{namespace}/resourceclaims/none")
    assert missing.value.status == 404  # allowed to look, the claim just does not exist
    event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": h.unique_name("ev")},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "dra-core",
        "reportingInstance": "test",
        "action": "Prepare",
        "reason": "Test",
        "type": "Normal",
        "regarding": {"kind": "Pod", "namespace": namespace, "name": "p", "apiVersion": "v1"},
    }
    h.create(agent, f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", event)
    core_event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": h.unique_name("ev")},
        "involvedObject": {"kind": "Pod", "namespace": namespace, "name": "p", "apiVersion": "v1"},
        "reason": "Test",
        "message": "rbac test",
        "type": "Normal",
    }
    h.create(agent, f"/api/v1/namespaces/{namespace}/events", core_event)

    # Not granted.
    sa_ns = installed["ServiceAccount"]["metadata"]["namespace"]
    for path in (
        f"/api/v1/namespaces/{sa_ns}/secrets",
        f"/api/v1/namespaces/{namespace}/secrets",
        "/api/v1/nodes",
        f"/api/v1/namespaces/{namespace}/pods",
        f"{h.RESOURCE_API}/namespaces/{namespace}/resourceclaims",
        f"{h.RESOURCE_API}/deviceclasses",
    ):
        denied(h.get, agent, path)
    denied(h.request, agent, "DELETE", SLICES)  # no deletecollection
    denied(h.merge_patch, agent, f"/api/v1/nodes/{nodes[0]}", {"metadata": {"labels": {"a": "b"}}})
    denied(
        h.request,
        agent,
        "PUT",
        f"{h.RESOURCE_API}/namespaces/{namespace}/resourceclaims/none/status",
        {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim"},
    )


def check_pod_template(kube_api, daemonset: dict[str, Any]) -> None:
    """Dry-run a Pod made from a DaemonSet's or Deployment's template, as its controller would
    create it: pod admission (priority class, service account, pod security) runs too."""
    template = daemonset["spec"]["template"]
    ns = daemonset["metadata"]["namespace"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": h.unique_name("agent-dry-run"),
            "labels": template["metadata"]["labels"],
        },
        "spec": {**template["spec"], "nodeName": "some-node"},
    }
    try:
        result = h.create(kube_api, f"/api/v1/namespaces/{ns}/pods", pod, query={"dryRun": "All"})
    except ApiException as e:
        pytest.fail(
            f"a pod of {daemonset['kind']} {daemonset['metadata']['name']} is rejected: {e.body}"
        )
    if template["spec"].get("priorityClassName") == "system-node-critical":
        assert result["spec"]["priority"] == 2000001000  # the class was resolved
    assert result["spec"]["serviceAccountName"] == template["spec"]["serviceAccountName"]


@pytest.mark.parametrize("directory", ["base", "overlays/i915", "overlays/fake", "webhook"])
def test_every_object_passes_a_server_side_dry_run(control_plane, kube_api, installed, directory):
    """The API server validates each object (DaemonSet, DeviceClasses, ...) without storing it;
    the namespace exists because ``installed`` applied it. A DeviceClass that names a feature
    gate this server has off is refused, as deploy/README.md says (the overlays are 1.36's)."""
    gates = control_plane.enabled_gates()
    objects = kustomize.build(DEPLOY / directory)
    assert objects
    # A pod needs its ServiceAccount to exist: create the ones ``installed`` did not.
    accounts = [
        o
        for o in objects
        if o["kind"] == "ServiceAccount"
        and o["metadata"]["name"] != installed["ServiceAccount"]["metadata"]["name"]
    ]
    for account in accounts:
        apply(kube_api, account)
    try:
        for obj in objects:
            try:
                result = apply(kube_api, obj, dry_run=True)
            except ApiException as e:
                needs = obj["metadata"].get("annotations", {}).get(GATES_ANNOTATION, "")
                off = [g for g in needs.split(",") if g and not gates.get(g)]
                if obj["kind"] == "DeviceClass" and off and "undefined field" in e.body:
                    continue
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} rejected: {e.body}")
            assert result["kind"] == obj["kind"]
            if obj["kind"] in ("DaemonSet", "Deployment"):
                check_pod_template(kube_api, result)
    finally:
        for account in accounts:
            h.delete(kube_api, object_path(account))
    (workload,) = [o for o in objects if o["kind"] in ("DaemonSet", "Deployment")]
    with pytest.raises(ApiException) as gone:  # the dry run stored nothing
        h.get(kube_api, object_path(workload))
    assert gone.value.status == 404


def test_the_i915_overlays_policy_binds_the_i915_driver(kube_api, installed, agent, nodes):
    """The i915 overlay's policy, applied over the base's: the same agent token may now write
    gpu.intel.com slices of its node and no longer fake ones. Dry runs (admission runs, nothing
    is stored); the base's policy is restored at the end."""
    (i915,) = [
        o
        for o in kustomize.build(DEPLOY / "overlays/i915")
        if o["kind"] == "ValidatingAdmissionPolicy"
    ]
    i915_driver = policy_driver([i915])
    assert i915_driver == "gpu.intel.com" != DRIVER

    def admitted(driver: str) -> bool:
        body = slice_body(h.unique_name("dry"), nodes[0], driver=driver)
        try:
            h.create(agent, SLICES, body, query={"dryRun": "All"})
        except ApiException as e:
            if e.status == 403 and "may only write ResourceSlices of that driver" in e.body:
                return False
            raise
        return True

    apply(kube_api, i915)
    try:
        h.wait_for(
            lambda: admitted(i915_driver) and not admitted(DRIVER),
            timeout=30,
            description="the i915 overlay's policy to be enforced",
        )
        # The node and pool checks are the base's.
        with pytest.raises(ApiException) as other_node:
            h.create(
                agent,
                SLICES,
                slice_body(h.unique_name("dry"), nodes[1], driver=i915_driver),
                query={"dryRun": "All"},
            )
        assert other_node.value.status == 403
    finally:
        apply(kube_api, installed["ValidatingAdmissionPolicy"])
        h.wait_for(
            lambda: admitted(DRIVER) and not admitted(i915_driver),
            timeout=30,
            description="the base's policy to be enforced again",
        )

"""Kubernetes scenarios for testing a DRA driver: Nodes, DeviceClasses, claims, pods, waits.

The objects a DRA test creates, written once for the project's tests, ``dra-core demo``, the
benchmarks and backend authors' own tests. Every function takes a *requester*: anything with
the ``request`` method of :class:`dra_core.kube.client.KubeClient` (plain JSON in and out, so
no field is lost to a typed model older than the server).

Facts these functions rely on, which a test cluster without kubelets makes visible:

* A new Node gets the taint ``node.kubernetes.io/not-ready:NoSchedule`` from admission; the
  node-lifecycle controller lifts it once the kubelet reports Ready. With no kubelet (and a
  control plane without that controller), :func:`create_ready_node` reports the node Ready
  itself and clears its taints, so the scheduler places pods on it.
* A pod bound to a node whose kubelet never confirms termination stays ``Terminating`` after
  a normal delete; :func:`delete_pod_now` deletes with a grace period of zero, which removes
  it at once (and lets the scheduler release its claims).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from dra_core.model import ClaimRef
from dra_core.testing.controlplane import selected_k8s_version

__all__ = (
    "RESOURCE_API",
    "Requester",
    "claim_body",
    "claim_ref",
    "create_claims_for_node",
    "create_namespace",
    "create_ready_node",
    "delete_namespace",
    "delete_pod_now",
    "delete_quietly",
    "device_class_body",
    "node_body",
    "pod_body",
    "published_slices",
    "ready_node",
    "wait_for",
    "wait_for_allocation",
    "wait_for_service_account",
)

RESOURCE_API = "/apis/resource.k8s.io/v1"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
MERGE_PATCH = "application/merge-patch+json"
T = TypeVar("T")


class Requester(Protocol):
    """What the scenario functions need from an API client (``KubeClient`` has it)."""

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any: ...


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.2
) -> T:
    """Poll ``check`` until it returns a truthy value, and return that value.

    An exception from ``check`` counts as "not yet"; the last one (or the last value) is named
    in the ``TimeoutError`` raised after ``timeout`` seconds, with ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            last = f"last value: {value!r}"
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported if it is still failing at the end
            last = f"last error: {type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:g} s waiting for {what} ({last})"
            raise TimeoutError(msg)
        time.sleep(interval)


# ---------------------------------------------------------------------------- namespaces
def create_namespace(
    client: Requester,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    service_account: bool = True,
) -> str:
    """Create namespace ``name``; with ``service_account``, return once its ``default``
    ServiceAccount exists (the controller-manager creates it; pods are refused before)."""
    metadata = {"name": name, "labels": dict(labels or {})}
    client.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": metadata},
    )
    if service_account:
        wait_for_service_account(client, name)
    return name


def wait_for_service_account(client: Requester, namespace: str, timeout: float = 30.0) -> None:
    """Wait for the ``default`` ServiceAccount of ``namespace``, which kube-controller-manager
    creates after the namespace; the API server refuses pods until it exists."""
    wait_for(
        f"ServiceAccount {namespace}/default (created by kube-controller-manager)",
        lambda: client.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        timeout,
    )


def delete_quietly(client: Requester, path: str, query: Mapping[str, str] | None = None) -> None:
    """``DELETE path`` (with ``query``, e.g. a field selector for a collection); an object
    already gone is fine."""
    from dra_core.kube.client import ApiError

    try:
        client.request("DELETE", path, query=query)
    except ApiError as exc:
        if not exc.not_found:
            raise


def delete_namespace(client: Requester, name: str) -> None:
    """Delete namespace ``name`` (its objects go with it, in the background); gone is fine."""
    delete_quietly(client, f"/api/v1/namespaces/{name}")


# ---------------------------------------------------------------------------- nodes
def node_body(
    name: str,
    labels: Mapping[str, str] | None = None,
    *,
    kubelet_version: str | None = None,
    cpu: str = "64",
    memory: str = "256Gi",
    pods: str = "250",
) -> dict[str, Any]:
    """A Node with a Ready condition and room for ``pods`` pods; no kubelet behind it.

    ``kubelet_version`` defaults to the release of the test control plane
    (``DRA_K8S_VERSION``): a kubelet newer than the API server would be version skew.
    """
    if kubelet_version is None:
        kubelet_version = selected_k8s_version()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    resources = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "1Ti"}
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **(labels or {}),
    }
    node_info = {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "kubeletVersion": kubelet_version,
        "kubeProxyVersion": "",
        "containerRuntimeVersion": "",
        "kernelVersion": "",
        "osImage": "",
        "bootID": "",
        "machineID": "",
        "systemUUID": "",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": all_labels},
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": dict(resources),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "no kubelet: the test plays its part",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": node_info,
        },
    }


def create_ready_node(
    client: Requester,
    name: str,
    labels: Mapping[str, str] | None = None,
    *,
    untaint: bool = True,
    **fields: str,
) -> dict[str, Any]:
    """Create a Node the scheduler places pods on: Ready, and without the not-ready taint.

    ``fields`` go to :func:`node_body` (``kubelet_version``, ``cpu``, ``memory``, ``pods``).
    The status is written through the ``status`` subresource, since a create may drop it.
    ``untaint=False`` keeps the taints admission gave the Node, as a node whose kubelet has
    not been seen yet has them (what a DaemonSet's pods must tolerate).
    """
    body = node_body(name, labels, **fields)
    client.request("POST", "/api/v1/nodes", body=body)
    node: dict[str, Any] = client.request(
        "PATCH",
        f"/api/v1/nodes/{name}/status",
        body={"status": body["status"]},
        content_type=MERGE_PATCH,
    )
    if untaint and node.get("spec", {}).get("taints"):
        node = client.request(
            "PATCH",
            f"/api/v1/nodes/{name}",
            body={"spec": {"taints": None}},
            content_type=MERGE_PATCH,
        )
    return node


@contextlib.contextmanager
def ready_node(client: Requester, name: str, **fields: Any) -> Iterator[str]:
    """:func:`create_ready_node` ``name`` (``fields`` go to it) for the ``with`` block; then
    delete the Node and the ResourceSlices published for it (an agent leaves them behind)."""
    create_ready_node(client, name, **fields)
    try:
        yield name
    finally:
        delete_quietly(client, f"/api/v1/nodes/{name}")
        query = {"fieldSelector": f"spec.nodeName={name}"}
        delete_quietly(client, f"{RESOURCE_API}/resourceslices", query)


# ---------------------------------------------------------------------------- classes and claims
def device_class_body(
    name: str, driver: str, extra_selectors: Iterable[str] = ()
) -> dict[str, Any]:
    """A DeviceClass of the devices of ``driver`` that match every CEL expression given."""
    expressions = [f'device.driver == "{driver}"', *extra_selectors]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": e}} for e in expressions]},
    }


def claim_body(
    name: str,
    device_class: str,
    *,
    request: str = "device",
    count: int = 1,
    selectors: Iterable[str] = (),
) -> dict[str, Any]:
    """A ResourceClaim for ``count`` devices of ``device_class`` in one request."""
    exactly: dict[str, Any] = {
        "deviceClassName": device_class,
        "allocationMode": "ExactCount",
        "count": count,
    }
    cel = [{"cel": {"expression": e}} for e in selectors]
    if cel:
        exactly["selectors"] = cel
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": request, "exactly": exactly}]}},
    }


def claim_ref(claim: Mapping[str, Any]) -> ClaimRef:
    """The kubelet's reference to a ResourceClaim object (namespace, name, uid)."""
    meta = claim["metadata"]
    return ClaimRef(meta["namespace"], meta["name"], meta["uid"])


# ---------------------------------------------------------------------------- pods
def pod_body(
    name: str,
    claims: Iterable[Mapping[str, str]] = (),
    *,
    node_name: str | None = None,
    on_node: str | None = None,
    image: str = PAUSE_IMAGE,
) -> dict[str, Any]:
    """A pod with one container using every claim of ``claims``.

    ``claims`` are the pod's entries: ``{"name": "gpu", "resourceClaimName": "c1"}`` or
    ``{"name": "gpu", "resourceClaimTemplateName": "t1"}``. ``node_name`` binds the pod
    without the scheduler (which then allocates nothing); ``on_node`` lets the scheduler
    place it on that node only, allocating its claims there.
    """
    entries = [dict(c) for c in claims]
    container: dict[str, Any] = {"name": "main", "image": image}
    if entries:
        container["resources"] = {"claims": [{"name": c["name"]} for c in entries]}
    spec: dict[str, Any] = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
    }
    if entries:
        spec["resourceClaims"] = entries
    if node_name:
        spec["nodeName"] = node_name
    if on_node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": on_node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def delete_pod_now(client: Requester, namespace: str, name: str) -> None:
    """Delete a pod at once, as its kubelet would confirm (there is none to do it)."""
    client.request(
        "DELETE",
        f"/api/v1/namespaces/{namespace}/pods/{name}",
        query={"gracePeriodSeconds": "0"},
    )


def create_claims_for_node(
    client: Requester,
    namespace: str,
    device_class: str,
    node: str,
    names: Sequence[str],
    *,
    count: int = 1,
) -> list[ClaimRef]:
    """For each name a claim of ``count`` devices and a pod ``pod-<name>`` using it, placed by
    the scheduler on ``node``; returns the claims' references (allocation comes later: see
    :func:`wait_for_allocation`)."""
    refs = []
    for name in names:
        claim = client.request(
            "POST",
            f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims",
            body=claim_body(name, device_class, count=count),
        )
        refs.append(claim_ref(claim))
        pod = pod_body(f"pod-{name}", [{"name": "device", "resourceClaimName": name}], on_node=node)
        client.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
    return refs


def wait_for_allocation(
    client: Requester, namespace: str, names: Iterable[str], timeout: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Wait until every claim of ``names`` is allocated; return the claims by name.

    On timeout the message names the claims still waiting and, for their pods, the
    scheduler's reason (the ``PodScheduled`` condition).
    """
    wanted = set(names)
    allocated: dict[str, dict[str, Any]] = {}

    def all_allocated() -> bool:
        items = client.request("GET", f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims")
        for claim in items["items"]:
            if claim["metadata"]["name"] in wanted and (claim.get("status") or {}).get(
                "allocation"
            ):
                allocated[claim["metadata"]["name"]] = claim
        return wanted <= allocated.keys()

    try:
        wait_for(f"{len(wanted)} claim(s) in {namespace} to be allocated", all_allocated, timeout)
    except TimeoutError as exc:
        missing = sorted(wanted - allocated.keys())
        msg = f"{exc}; not allocated: {', '.join(missing)}{_scheduling_reasons(client, namespace)}"
        raise TimeoutError(msg) from None
    return {name: allocated[name] for name in wanted}


def _scheduling_reasons(client: Requester, namespace: str) -> str:
    try:
        pods = client.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    except Exception:  # noqa: BLE001 - only decorates a timeout message
        return ""
    reasons = sorted(
        {
            f"{p['metadata']['name']}: {c.get('message') or c.get('reason')}"
            for p in pods
            for c in (p.get("status") or {}).get("conditions") or ()
            if c.get("type") == "PodScheduled" and c.get("status") == "False"
        }
    )
    return f"; unschedulable pods: {'; '.join(reasons[:5])}" if reasons else ""


# ---------------------------------------------------------------------------- slices
def published_slices(client: Requester, node: str, driver: str) -> list[dict[str, Any]] | None:
    """The driver's ResourceSlices of ``node`` once every pool is complete, else None.

    A pool is complete when it has ``resourceSliceCount`` slices of its newest generation; an
    agent writes them one after another, and slices of an older generation may remain while
    it replaces them (those are not returned).
    """
    listed = client.request(
        "GET",
        f"{RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node},spec.driver={driver}"},
    )["items"]
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for item in listed:
        by_pool.setdefault(item["spec"]["pool"]["name"], []).append(item)
    published: list[dict[str, Any]] = []
    for pool_slices in by_pool.values():
        newest = max(int(s["spec"]["pool"]["generation"]) for s in pool_slices)
        current = [s for s in pool_slices if int(s["spec"]["pool"]["generation"]) == newest]
        if len(current) != int(current[0]["spec"]["pool"]["resourceSliceCount"]):
            return None
        published.extend(current)
    return published or None

"""Test helpers for the real control plane: plain-dict objects through the kubernetes client.

Everything goes through :func:`request` (``ApiClient.call_api`` with raw JSON in and out), so no
field is dropped by the typed models of a client older than the server (DESIGN.md, "Practical
notes"). Errors are ``kubernetes.client.exceptions.ApiException`` with ``.status`` and ``.body``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from dra_core.kube.client import KubeClient
from dra_core.testing import scenario

RESOURCE_API = scenario.RESOURCE_API
TEST_DRIVER = "test.dra-core.example.com"


# ---------------------------------------------------------------------------- raw access
def request(
    api,
    method: str,
    path: str,
    body: Any | None = None,
    *,
    query: dict[str, Any] | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> Any:
    """Send ``method path`` with a JSON body; return the decoded JSON response (or None)."""
    headers = {"Accept": "application/json", "Content-Type": content_type}
    # kubernetes client >= 35 (openapi-generator "python" style): serialize, send, deserialize.
    m, url, hdrs, data, post = api.param_serialize(
        method=method.upper(),
        resource_path=path,
        query_params=list((query or {}).items()) or None,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(
        m, url, header_params=hdrs, body=data, post_params=post, _request_timeout=timeout
    )
    resp.read()
    result = api.response_deserialize(resp, {"2XX": "object"}).data
    return result if result != "" else None


def get(api, path: str, **kw) -> Any:
    return request(api, "GET", path, **kw)


def create(api, path: str, body: dict[str, Any], **kw) -> dict[str, Any]:
    return request(api, "POST", path, body, **kw)


def delete(api, path: str, *, ignore_missing: bool = True, **kw) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return request(api, "DELETE", path, **kw)
    except ApiException as e:
        if ignore_missing and e.status == 404:
            return None
        raise


def merge_patch(api, path: str, patch: dict[str, Any], **kw) -> dict[str, Any]:
    return request(api, "PATCH", path, patch, content_type="application/merge-patch+json", **kw)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- waiting
def wait_for(
    condition_fn: Callable[[], Any],
    timeout: float = 30.0,
    description: str = "condition",
    interval: float = 0.2,
) -> Any:
    """Poll ``condition_fn`` until it returns a truthy value (:func:`scenario.wait_for`)."""
    return scenario.wait_for(description, condition_fn, timeout, interval)


# ---------------------------------------------------------------------------- core objects
def requester(api) -> KubeClient:
    """``api`` as the requester of :mod:`dra_core.testing.scenario` (no idle-connection
    closer: the ApiClient is shared)."""
    return KubeClient(api, idle_timeout=None)


def create_namespace(api, name: str | None = None, labels: dict[str, str] | None = None) -> str:
    """A new namespace (``scenario.create_namespace``); callers that start pods in it wait
    for its ServiceAccount (:func:`wait_for_default_service_account`)."""
    name = name or unique_name("ns")
    return scenario.create_namespace(requester(api), name, labels=labels, service_account=False)


def delete_namespace(api, name: str, wait: bool = False, timeout: float = 60.0) -> None:
    scenario.delete_namespace(requester(api), name)
    if wait:
        from kubernetes.client.exceptions import ApiException

        def gone():
            try:
                get(api, f"/api/v1/namespaces/{name}")
                return False
            except ApiException as e:
                return e.status == 404

        wait_for(gone, timeout, f"namespace {name} to be deleted")


def wait_for_default_service_account(api, namespace: str, timeout: float = 30.0) -> None:
    scenario.wait_for_service_account(requester(api), namespace, timeout)


def delete_node(api, name: str) -> None:
    delete(api, f"/api/v1/nodes/{name}")


pod_body = scenario.pod_body


def create_pod(api, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return create(api, f"/api/v1/namespaces/{namespace}/pods", body)


def get_pod(api, namespace: str, name: str) -> dict[str, Any]:
    return get(api, f"/api/v1/namespaces/{namespace}/pods/{name}")


def delete_pod(api, namespace: str, name: str) -> None:
    delete(api, f"/api/v1/namespaces/{namespace}/pods/{name}", query={"gracePeriodSeconds": 0})


def wait_for_pod_scheduled(api, namespace: str, name: str, timeout: float = 60.0) -> dict[str, Any]:
    def scheduled():
        pod = get_pod(api, namespace, name)
        return pod if pod.get("spec", {}).get("nodeName") else None

    try:
        return wait_for(scheduled, timeout, f"pod {namespace}/{name} to be bound to a node")
    except TimeoutError as e:
        pod = get_pod(api, namespace, name)
        conds = pod.get("status", {}).get("conditions", [])
        raise TimeoutError(f"{e}; pod conditions: {json.dumps(conds)}") from None


# ---------------------------------------------------------------------------- resource.k8s.io
def create_device_class(
    api, name: str | None = None, driver: str = TEST_DRIVER, extra_selectors: Iterable[str] = ()
) -> dict[str, Any]:
    name = name or unique_name("class")
    body = scenario.device_class_body(name, driver, extra_selectors)
    return create(api, f"{RESOURCE_API}/deviceclasses", body)


def delete_device_class(api, name: str) -> None:
    delete(api, f"{RESOURCE_API}/deviceclasses/{name}")


def device(
    name: str,
    attributes: dict[str, Any] | None = None,
    capacity: dict[str, str] | None = None,
    **extra,
) -> dict[str, Any]:
    """A v1 Device. ``attributes`` values: str -> string, bool -> bool, int -> int, or a raw
    DeviceAttribute dict; ``capacity`` values are quantities."""
    attrs: dict[str, Any] = {}
    for k, v in (attributes or {}).items():
        if isinstance(v, dict):
            attrs[k] = v
        elif isinstance(v, bool):
            attrs[k] = {"bool": v}
        elif isinstance(v, int):
            attrs[k] = {"int": v}
        else:
            attrs[k] = {"string": str(v)}
    d: dict[str, Any] = {"name": name}
    if attrs:
        d["attributes"] = attrs
    if capacity:
        d["capacity"] = {k: {"value": v} for k, v in capacity.items()}
    d.update(extra)
    return d


def resource_slice_body(
    name: str,
    node_name: str,
    devices: list[dict[str, Any]],
    *,
    driver: str = TEST_DRIVER,
    pool: str | None = None,
    generation: int = 1,
    slice_count: int = 1,
) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node_name,
            "pool": {
                "name": pool or node_name,
                "generation": generation,
                "resourceSliceCount": slice_count,
            },
            "devices": devices,
        },
    }


def create_resource_slice(api, body: dict[str, Any]) -> dict[str, Any]:
    return create(api, f"{RESOURCE_API}/resourceslices", body)


def delete_resource_slice(api, name: str) -> None:
    delete(api, f"{RESOURCE_API}/resourceslices/{name}")


def resource_claim_body(
    name: str,
    device_class: str,
    *,
    request_name: str = "req",
    count: int = 1,
    selectors: Iterable[str] = (),
) -> dict[str, Any]:
    return scenario.claim_body(
        name, device_class, request=request_name, count=count, selectors=selectors
    )


def create_resource_claim(api, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return create(api, f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims", body)


def get_resource_claim(api, namespace: str, name: str) -> dict[str, Any]:
    return get(api, f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims/{name}")


def create_resource_claim_template(
    api, namespace: str, name: str, claim_spec: dict[str, Any]
) -> dict[str, Any]:
    return create(
        api,
        f"{RESOURCE_API}/namespaces/{namespace}/resourceclaimtemplates",
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": name},
            "spec": {"spec": claim_spec},
        },
    )


def wait_for_claim_allocated(
    api, namespace: str, name: str, timeout: float = 60.0
) -> dict[str, Any]:
    """The claim once allocated (``scenario.wait_for_allocation``)."""
    return scenario.wait_for_allocation(requester(api), namespace, [name], timeout)[name]

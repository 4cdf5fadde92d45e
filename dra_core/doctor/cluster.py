"""The cluster's checks: the API server, the optional features it keeps, and the kubelet.

The features are found by asking the server, not from its version: one dry-run create per
feature (``dryRun=All``, nothing is stored), with the slices the publisher would write, shows
which fields come back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dra_core.doctor.runtime import RuntimeInfo, parse_version
from dra_core.hookspecs import DoctorCheck
from dra_core.kube.client import ApiError, KubeClient, load_client
from dra_core.model import (
    Capacity,
    CounterConsumption,
    CounterSet,
    Device,
    Inventory,
    ModelError,
    RequestPolicy,
    Taint,
    ValidRange,
)
from dra_core.slices.build import build_slices
from dra_core.slices.compare import gated_fields
from dra_core.slices.publisher import FEATURE_GATES
from dra_core.slices.watch import SLICES_PATH

__all__ = (
    "FEATURES",
    "Feature",
    "api_checks",
    "cluster_checks",
    "kubelet_version_check",
    "used_fields",
)

#: Kubelets from 1.34 speak the DRA gRPC API v1; 1.32 and 1.33 only v1beta1, which the agent
#: serves too; older ones speak versions the agent does not serve.
_KUBELET_V1 = (1, 34)
_KUBELET_V1BETA1 = (1, 32)
_GENERATE_NAME = "dra-core-doctor-"
_PROBE = "doctor-probe"


@dataclass(frozen=True)
class Feature:
    """An optional API feature the agent publishes with, and the slice that probes it."""

    name: str
    #: The slice fields it adds (see `dra_core.slices.compare.gated_fields`).
    fields: tuple[str, ...]
    #: What goes wrong when the API server drops its fields.
    consequence: str
    #: An inventory that uses it and nothing else optional.
    probe: Inventory
    #: Whether the core uses it whatever the inventory (device taints mark unhealthy devices).
    used_by_core: bool = False

    @property
    def gate(self) -> str:
        return FEATURE_GATES[self.fields[0]]


FEATURES = (
    Feature(
        "partitionable devices",
        ("sharedCounters", "consumesCounters"),
        "devices that share counters (partitions, SR-IOV VFs beside their GPU) are published "
        "without them, so the scheduler can allocate a whole device and its parts to "
        "different pods, and the node refuses the second",
        Inventory(
            devices=(Device(_PROBE, consumes_counters=(CounterConsumption(_PROBE, {"n": "1"}),)),),
            counter_sets=(CounterSet(_PROBE, {"n": "1"}),),
        ),
    ),
    Feature(
        "consumable capacity",
        ("allowMultipleAllocations", "requestPolicy"),
        "shared devices are published without allowMultipleAllocations and their request "
        "policies, so each goes to one claim only, and DeviceClasses that select on "
        "allowMultipleAllocations are refused",
        Inventory(
            devices=(
                Device(
                    _PROBE,
                    capacity={
                        "memory": Capacity(
                            "1Gi", RequestPolicy("1Mi", valid_range=ValidRange("1Mi"))
                        )
                    },
                    allow_multiple_allocations=True,
                ),
            )
        ),
    ),
    Feature(
        "device taints",
        ("taints",),
        "unhealthy devices cannot be tainted, so the scheduler can allocate them and their "
        "pods fail at prepare",
        Inventory(devices=(Device(_PROBE, taints=(Taint("dra-core.dev/doctor", "NoSchedule"),)),)),
        used_by_core=True,
    ),
)


def used_fields(inventory: Inventory) -> set[str]:
    """The gated ResourceSlice fields the inventory's slices carry (node name immaterial)."""
    slices = build_slices("doctor.dra-core.dev", "doctor", "doctor", inventory, generation=1)
    return set().union(*(gated_fields(s["spec"]) for s in slices)) if slices else set()


def cluster_checks(
    *,
    kubeconfig: str | None,
    node_name: str,
    driver: str,
    used: set[str] | None,
    timeout: float,
) -> tuple[list[DoctorCheck], DoctorCheck, RuntimeInfo | None]:
    """The API server's checks, the kubelet's check, and the runtime the Node reports.

    ``kubeconfig`` None means ``$KUBECONFIG`` or the in-cluster service account; ``used`` as
    for `api_checks`.
    """
    client = _client(kubeconfig, timeout)
    if isinstance(client, DoctorCheck):
        skipped = DoctorCheck.skip("kubelet", "its version is read from the API server (above)")
        return [client], skipped, None
    try:
        api = api_checks(client, driver, node_name, used)
        if api[0].status == "fail":  # unreachable or credentials refused: said once, above
            return api, DoctorCheck.skip("kubelet", "the API server check failed (above)"), None
        kubelet, runtime = _kubelet_check(client, node_name)
        return api, kubelet, runtime
    finally:
        client.api.close()  # type: ignore[no-untyped-call]


def _client(kubeconfig: str | None, timeout: float) -> KubeClient | DoctorCheck:
    """A client with the agent's credentials, or the API server's skipped or failed check."""
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        why = (
            "no kubeconfig (--kubeconfig, KUBECONFIG) and not in a pod (KUBERNETES_SERVICE_HOST "
            "is unset), so the API server, the features it keeps and the kubelet's version are "
            "not checked"
        )
        return DoctorCheck.skip("API server", why)
    where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
    try:
        return load_client(kubeconfig, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - the kubernetes loaders raise many types
        fix = (
            "give a readable kubeconfig with --kubeconfig, or run doctor in the agent's pod "
            "(kubectl exec), where the service account is mounted"
        )
        return DoctorCheck.fail("API server", f"cannot load {where}: {exc}", fix)


# ---------------------------------------------------------------------------------------------
# The API server
# ---------------------------------------------------------------------------------------------


def api_checks(
    client: KubeClient, driver: str, node_name: str, used: set[str] | None
) -> list[DoctorCheck]:
    """Reachable, serves resource.k8s.io/v1, accepts a slice, keeps each feature's fields.

    ``used`` are the gated fields the backend's inventory uses (None when unknown): a
    dropped feature fails when used (or unknown) and warns otherwise.
    """
    host = getattr(getattr(client.api, "configuration", None), "host", "the API server")
    try:
        version = client.get("/version") or {}
    except ApiError as exc:
        return [_api_error_check("API server", exc, f"at {host}")]
    checks = [
        DoctorCheck.ok("API server", f"Kubernetes {version.get('gitVersion', '?')} at {host}"),
        _resource_api_check(client),
    ]
    if checks[-1].status == "fail":
        return checks + _skip_features("resource.k8s.io/v1 is not served")
    slice_check = "ResourceSlice of this node"
    plain = _probe(client, driver, node_name, Inventory(devices=(Device(_PROBE),)), slice_check)
    if isinstance(plain, DoctorCheck):
        why = "the dry-run create of a plain ResourceSlice failed"
        return [*checks, plain, *_skip_features(why)]
    found = f"a ResourceSlice of driver {driver} in pool {node_name} is accepted (dry run)"
    checks.append(DoctorCheck.ok(slice_check, found))
    return checks + [_feature_check(client, driver, node_name, f, used) for f in FEATURES]


def _skip_features(why: str) -> list[DoctorCheck]:
    return [DoctorCheck.skip(f.name, why) for f in FEATURES]


def _api_error_check(name: str, exc: ApiError, where: str = "") -> DoctorCheck:
    where = f" {where}" if where else ""
    if exc.status == 0:
        fix = "check the server address and the network (the kubeconfig's server, or the pod's)"
        return DoctorCheck.fail(name, f"unreachable{where}: {exc.message}", fix)
    if exc.status == 401:
        fix = "the credentials are not accepted: renew the kubeconfig or the service-account token"
        return DoctorCheck.fail(name, f"HTTP 401{where}: {exc.message}", fix)
    if exc.status == 403:
        fix = (
            "the credentials lack a permission the agent needs: apply deploy/base/rbac.yaml "
            "(ClusterRole dra-core-agent) and bind it to the agent's service account"
        )
        return DoctorCheck.fail(name, f"forbidden{where}: {exc.message}", fix)
    return DoctorCheck.fail(name, f"{exc}", "see the API server's message")


def _resource_api_check(client: KubeClient) -> DoctorCheck:
    name = "resource.k8s.io/v1"
    fix = (
        "the agent needs Kubernetes 1.34 or later, which serves resource.k8s.io/v1; if the "
        "server is that recent, remove resource.k8s.io/v1=false from kube-apiserver's "
        "--runtime-config"
    )
    try:
        group = client.get("/apis/resource.k8s.io") or {}
    except ApiError as exc:
        if exc.not_found:
            return DoctorCheck.fail(name, "the API group resource.k8s.io is not served", fix)
        return _api_error_check(name, exc)
    versions = [v.get("version", "") for v in group.get("versions") or ()]
    if "v1" not in versions:
        return DoctorCheck.fail(name, f"not served; resource.k8s.io serves {versions}", fix)
    others = [v for v in versions if v != "v1"]
    return DoctorCheck.ok(name, "served" + (f" (also {', '.join(others)})" if others else ""))


def _probe(
    client: KubeClient, driver: str, node_name: str, inventory: Inventory, name: str
) -> set[str] | DoctorCheck:
    """Dry-run create the slices that publish ``inventory``; the gated fields dropped, or the
    failed check ``name`` with the server's message when the create is refused."""
    try:
        slices = build_slices(driver, node_name, node_name, inventory, generation=1)
    except ModelError as exc:
        fix = "--node-name (NODE_NAME) must be the Node's name, a DNS subdomain"
        return DoctorCheck.fail(name, str(exc), fix)
    dropped: set[str] = set()
    for body in slices:
        metadata = {k: v for k, v in body["metadata"].items() if k != "name"}
        sent = {**body, "metadata": {**metadata, "generateName": _GENERATE_NAME}}
        try:
            returned = client.request("POST", SLICES_PATH, body=sent, query={"dryRun": "All"})
        except ApiError as exc:
            if exc.status == 422:
                fix = (
                    "the API server refuses the slices this agent publishes: use a Kubernetes "
                    "release RELEASE.md lists as supported"
                )
                return DoctorCheck.fail(name, f"refused (HTTP 422): {exc.message}", fix)
            return _api_error_check(name, exc)
        dropped |= gated_fields(sent["spec"]) - gated_fields((returned or {}).get("spec", {}))
    return dropped


def _feature_check(
    client: KubeClient, driver: str, node_name: str, feature: Feature, used: set[str] | None
) -> DoctorCheck:
    result = _probe(client, driver, node_name, feature.probe, feature.name)
    if isinstance(result, DoctorCheck):
        return result
    if not result:
        fields = " and ".join(feature.fields)
        return DoctorCheck.ok(
            feature.name, f"{fields} kept by the API server (feature gate {feature.gate} is on)"
        )
    dropped = (
        f"the API server drops {' and '.join(sorted(result))} from ResourceSlices (feature gate "
        f"{feature.gate} is off)"
    )
    fix = (
        f"turn on the feature gate {feature.gate} in kube-apiserver and kube-scheduler "
        f"(--feature-gates={feature.gate}=true; on by default from Kubernetes 1.36), then "
        f"restart the agent"
    )
    if used is None:
        found = f"{dropped}, and discovery failed, so this node's devices may use it"
    elif used & set(feature.fields):
        found = f"{dropped}, and this node's devices use it"
    else:
        but = ", but the agent's health taints do" if feature.used_by_core else " now"
        found = f"{dropped}; this node's devices do not use it{but}"
        return DoctorCheck.warn(feature.name, f"{found}: {feature.consequence}", fix)
    return DoctorCheck.fail(feature.name, f"{found}: {feature.consequence}", fix)


# ---------------------------------------------------------------------------------------------
# The kubelet
# ---------------------------------------------------------------------------------------------


def _kubelet_check(client: KubeClient, node_name: str) -> tuple[DoctorCheck, RuntimeInfo | None]:
    """The kubelet's version check from this node's Node, and the runtime the Node reports."""
    name = f"Node {node_name}"
    try:
        node = client.get(f"/api/v1/nodes/{node_name}") or {}
    except ApiError as exc:
        if exc.not_found:
            fix = (
                "--node-name (NODE_NAME) must be the name the kubelet registered (kubectl get "
                "nodes); the DaemonSet sets it from spec.nodeName"
            )
            return DoctorCheck.fail(name, "not found", fix), None
        return _api_error_check(name, exc), None
    info = node.get("status", {}).get("nodeInfo") or {}
    return (
        kubelet_version_check(info.get("kubeletVersion", "")),
        RuntimeInfo.from_node(info.get("containerRuntimeVersion", ""), node_name),
    )


def kubelet_version_check(version: str) -> DoctorCheck:
    """Which DRA gRPC API a kubelet of ``version`` (``v1.34.2``) speaks."""
    name = "kubelet version"
    parsed = parse_version(version)
    upgrade = "upgrade the kubelet to Kubernetes 1.34 or later"
    if parsed is None:
        found = f"the Node reports kubelet version {version!r}, which says nothing"
        return DoctorCheck.warn(name, found, f"check the kubelet by hand; {upgrade}")
    if parsed[:2] >= _KUBELET_V1:
        return DoctorCheck.ok(name, f"kubelet {version} speaks the DRA gRPC API v1")
    if parsed[:2] >= _KUBELET_V1BETA1:
        found = (
            f"kubelet {version} speaks the DRA gRPC API v1beta1 only, which the agent serves too"
        )
        fix = (
            f"{upgrade}; until then its feature gate DynamicResourceAllocation must be on (off by "
            f"default before 1.34)"
        )
        return DoctorCheck.warn(name, found, fix)
    found = f"kubelet {version} speaks no DRA gRPC API the agent serves (v1, v1beta1)"
    return DoctorCheck.fail(name, found, upgrade)

"""The cluster's checks: the API server, the optional features it keeps, and the kubelet.

The features are found by asking the server, not from its version, as the agent does at
start (`dra_core.slices.features.probe`: one dry-run create, ``dryRun=All``, nothing is
stored), and what the agent would leave out on this node is computed by the same rule
(`dra_core.slices.features.safe_inventory`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dra_core.doctor.runtime import RuntimeInfo, parse_version
from dra_core.hookspecs import DoctorCheck
from dra_core.kube.client import ApiError, KubeClient, load_client
from dra_core.model import Inventory, is_dns_subdomain
from dra_core.releases import ReleaseError, all_mode_over_counters_crashes_scheduler
from dra_core.slices.features import (
    FEATURES,
    PARTITIONABLE,
    Feature,
    LeftOut,
    ServerFeatures,
    probe,
    safe_inventory,
)

__all__ = (
    "ALL_MODE_OVER_COUNTERS",
    "api_checks",
    "cluster_checks",
    "kubelet_version_check",
    "release_warnings",
)

#: Kubelets from 1.34 speak the DRA gRPC API v1; 1.32 and 1.33 only v1beta1, which the agent
#: serves too; older ones speak versions the agent does not serve.
_KUBELET_V1 = (1, 34)
_KUBELET_V1BETA1 = (1, 32)


def cluster_checks(
    *,
    kubeconfig: str | None,
    node_name: str,
    driver: str,
    inventory: Inventory | None,
    timeout: float,
) -> tuple[list[DoctorCheck], DoctorCheck, RuntimeInfo | None]:
    """The API server's checks, the kubelet's check, and the runtime the Node reports.

    ``kubeconfig`` None means ``$KUBECONFIG`` or the in-cluster service account;
    ``inventory`` as for `api_checks`.
    """
    client = _client(kubeconfig, timeout)
    if isinstance(client, DoctorCheck):
        skipped = DoctorCheck.skip("kubelet", "its version is read from the API server (above)")
        return [client], skipped, None
    try:
        api = api_checks(client, driver, node_name, inventory)
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
    client: KubeClient, driver: str, node_name: str, inventory: Inventory | None
) -> list[DoctorCheck]:
    """Reachable, serves resource.k8s.io/v1, accepts a slice, keeps each feature's fields.

    ``inventory`` is what the backend discovered (None when discovery failed): a feature the
    server drops warns with the devices the agent leaves out because of it.
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
    if not is_dns_subdomain(node_name):
        fix = "--node-name (NODE_NAME) must be the Node's name, a DNS subdomain"
        found = f"node name {node_name!r} is not a DNS subdomain"
        failed = DoctorCheck.fail(slice_check, found, fix)
        return [*checks, failed, *_skip_features("the node name is invalid")]
    try:
        server = probe(client, driver, node_name)
    except ApiError as exc:
        why = "the dry-run create of a ResourceSlice failed"
        return [*checks, _refused_check(slice_check, exc), *_skip_features(why)]
    layout = (
        "counter sets beside the devices consuming them (Kubernetes 1.34)"
        if server.counters_beside_devices
        else "counter sets in slices of their own"
    )
    found = (
        f"a ResourceSlice of driver {driver} in pool {node_name} is accepted (dry run), "
        f"with {layout}"
    )
    checks.append(DoctorCheck.ok(slice_check, found))
    entries = safe_inventory(inventory, server)[1] if inventory else ()
    left_out = {e.feature: e for e in entries}
    # Left out for a limit of the release (1.34's), not for a gate that is off.
    limits = [
        DoctorCheck.warn(
            f"{e.feature.name} within the API server's limits",
            f"{e.feature.why}: {_left_out_text(e)}",
            e.feature.fix,
        )
        for e in entries
        if e.feature not in FEATURES
    ]
    checks += [_feature_check(server, f, inventory, left_out.get(f)) for f in FEATURES]
    return checks + limits + _scheduler_bug_checks(version, server, inventory)


#: The check that warns where the scheduler crashes on allocationMode All over counters.
ALL_MODE_OVER_COUNTERS = "allocationMode All over devices that consume counters"


def release_warnings(version: str, gates: Mapping[str, bool]) -> set[str]:
    """The names of the API server checks that rightly warn on Kubernetes ``version`` with
    its feature ``gates`` on or off, for a node publishing devices that consume counters: each
    feature whose gate is off, and `ALL_MODE_OVER_COUNTERS` where the release's scheduler
    crashes on such claims. Raises `ReleaseError` for a version it cannot read."""
    warned = {f.name for f in FEATURES if not gates.get(f.gate, False)}
    if gates.get(PARTITIONABLE.gate) and all_mode_over_counters_crashes_scheduler(version):
        warned.add(ALL_MODE_OVER_COUNTERS)
    return warned


def _scheduler_bug_checks(
    version: dict[str, str], server: ServerFeatures, inventory: Inventory | None
) -> list[DoctorCheck]:
    """A warning where the cluster's scheduler is known to crash on what this node publishes."""
    git_version = version.get("gitVersion", "")
    try:
        crashes = all_mode_over_counters_crashes_scheduler(git_version)
    except ReleaseError:
        return []
    consuming = [d.name for d in inventory.devices if d.consumes_counters] if inventory else []
    if not (crashes and server.keeps(PARTITIONABLE) and consuming):
        return []
    return [
        DoctorCheck.warn(
            ALL_MODE_OVER_COUNTERS,
            f"the kube-scheduler of Kubernetes {git_version} crashes on a claim with "
            f"allocationMode All that can select one of {len(consuming)} devices consuming "
            f"counters here (e.g. {consuming[0]})",
            "upgrade the control plane to 1.36 or later, or request these devices with "
            "allocationMode ExactCount (a selector can name every device)",
        )
    ]


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


def _refused_check(name: str, exc: ApiError) -> DoctorCheck:
    if exc.status == 422:
        fix = (
            "the API server refuses the slices this agent publishes: use a Kubernetes "
            "release RELEASE.md lists as supported"
        )
        return DoctorCheck.fail(name, f"refused (HTTP 422): {exc.message}", fix)
    return _api_error_check(name, exc)


def _feature_check(
    server: ServerFeatures, feature: Feature, inventory: Inventory | None, left_out: LeftOut | None
) -> DoctorCheck:
    if server.keeps(feature):
        fields = " and ".join(feature.fields)
        return DoctorCheck.ok(
            feature.name, f"{fields} kept by the API server (feature gate {feature.gate} is on)"
        )
    dropped = (
        f"the API server drops {' and '.join(sorted(feature.fields))} from ResourceSlices "
        f"(feature gate {feature.gate} is off)"
    )
    fix = (
        f"turn on the feature gate {feature.gate} in kube-apiserver and kube-scheduler "
        f"(--feature-gates={feature.gate}=true; on by default from Kubernetes 1.36), then "
        f"restart the agent"
    )
    if inventory is None:
        found = f"{dropped}, and discovery failed, so the agent may leave devices out: "
    elif left_out is not None:
        found = f"{dropped}: {_left_out_text(left_out)}; "
    else:
        but = ", but unhealthy ones would be" if feature.used_by_core else " now"
        found = f"{dropped}; the agent leaves none of this node's devices out{but}: "
    return DoctorCheck.warn(feature.name, found + feature.without, fix)


def _left_out_text(entry: LeftOut) -> str:
    parts = []
    if entry.devices:
        parts.append(f"the agent leaves out {', '.join(entry.devices)}")
    if entry.exclusive:
        parts.append(f"publishes {', '.join(entry.exclusive)} as exclusive devices")
    return " and ".join(parts)


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

"""``dra-core doctor`` against real API servers: the session's (``DRA_K8S_VERSION`` with
``DRA_TEST_GATES``) and one started here, of the same release, with partitionable devices,
consumable capacity and device taints turned off, whose kube-apiserver really drops those
fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dra_backend_fake import plugin as fake_plugin
from dra_backend_fake.inventory import build, default_specs

from dra_core.doctor import FEATURES, DoctorSettings, api_checks, run_doctor
from dra_core.doctor.cluster import ALL_MODE_OVER_COUNTERS, release_warnings
from dra_core.kube.client import KubeClient, load_client
from dra_core.model import Inventory
from dra_core.plugins import from_objects
from dra_core.slices.features import release_features
from dra_core.slices.watch import SLICES_PATH
from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers
from tests.slices.test_features_controlplane import GATES_OFF

pytestmark = pytest.mark.controlplane

FAKE = "fake.dra-core.dev"


def client_of(control_plane: ControlPlane) -> KubeClient:
    return load_client(str(control_plane.kubeconfig_path))


@pytest.fixture(scope="module")
def gates_off(control_plane) -> Iterator[ControlPlane]:
    """etcd and kube-apiserver only (about 6 s), with the features' gates off."""
    cp = ControlPlane(
        binaries=control_plane.binaries,
        scheduler=False,
        controller_manager=False,
        k8s_version=control_plane.k8s_version,
        gates=control_plane.gates,
        feature_gates=GATES_OFF,
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_the_session_api_server_features_are_found_with_one_dry_run(control_plane):
    client = client_of(control_plane)
    checks = api_checks(client, FAKE, "doctor-node", build(default_specs()))
    kept = {f.name: control_plane.enabled_gates().get(f.gate, False) for f in FEATURES}
    # The default inventory has devices consuming counters: where the scheduler crashes on an
    # allocationMode All claim over such devices (1.35 with the gate on), doctor warns.
    crashes = ALL_MODE_OVER_COUNTERS in release_warnings(
        control_plane.k8s_version, control_plane.enabled_gates()
    )
    assert statuses(checks) == {
        "API server": "ok",
        "resource.k8s.io/v1": "ok",
        "ResourceSlice of this node": "ok",
        **{name: "ok" if on else "warn" for name, on in kept.items()},
        **({ALL_MODE_OVER_COUNTERS: "warn"} if crashes else {}),
    }
    found = {c.name: c.found for c in checks}
    assert found["API server"] == (
        f"Kubernetes {control_plane.k8s_version} at {control_plane.server}"
    )
    if kept["partitionable devices"]:
        assert found["partitionable devices"] == (
            "sharedCounters and consumesCounters kept by the API server (feature gate "
            "DRAPartitionableDevices is on)"
        )
    # One dry run; two on 1.34 with partitionable devices on (counters beside devices).
    server = release_features(control_plane.k8s_version, control_plane.enabled_gates())
    beside = server.counters_beside_devices
    assert ("beside the devices" in found["ResourceSlice of this node"]) == beside
    assert client.request_count("create", "resourceslices") == (2 if beside else 1)
    stored = client.get(SLICES_PATH, {"fieldSelector": "spec.nodeName=doctor-node"})
    assert stored["items"] == [], "a dry run stores nothing"


def test_gates_off_are_reported_with_the_devices_left_out(gates_off):
    client = client_of(gates_off)
    inventory = build(default_specs())
    checks = {c.name: c for c in api_checks(client, FAKE, "doctor-node", inventory)}
    assert checks["ResourceSlice of this node"].status == "ok"
    partitions = checks["partitionable devices"]
    assert partitions.status == "warn"
    assert partitions.found.startswith(
        "the API server drops consumesCounters and sharedCounters from ResourceSlices (feature "
        "gate DRAPartitionableDevices is off): the agent leaves out big-0-p0, big-0-p1, "
        "big-0-p2, big-0-p3; devices whose exclusivity depends on shared counters"
    )
    assert partitions.fix.startswith(
        "turn on the feature gate DRAPartitionableDevices in kube-apiserver and kube-scheduler"
    )
    sharing = checks["consumable capacity"]
    assert sharing.status == "warn"
    assert sharing.found.startswith(
        "the API server drops allowMultipleAllocations and requestPolicy from ResourceSlices "
        "(feature gate DRAConsumableCapacity is off): the agent leaves out shared-0; "
    )
    taints = checks["device taints"]
    assert taints.status == "warn"
    assert (
        "; the agent leaves none of this node's devices out, but unhealthy ones would be: "
        in taints.found
    )
    plain = api_checks(client, FAKE, "doctor-node", Inventory())
    assert "leaves none of this node's devices out now: " in plain[-2].found


def test_a_dropped_feature_warns_when_the_inventory_is_unknown(gates_off):
    checks = api_checks(client_of(gates_off), FAKE, "doctor-node", None)
    features = [c for c in checks if c.name in {f.name for f in FEATURES}]
    assert [c.status for c in features] == ["warn"] * 3
    assert all(
        ", and discovery failed, so the agent may leave devices out: " in c.found for c in features
    )


@pytest.fixture
def node_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {
        "registration_dir": tmp_path / "plugins_registry",
        "plugins_dir": tmp_path / "plugins",
        "cdi_dir": tmp_path / "cdi",
    }
    for path in dirs.values():
        path.mkdir()
    return dirs


def test_kubelet_and_runtime_versions_come_from_the_node(
    control_plane, kube_api, dra_kube_client, node_dirs, tmp_path
):
    name = helpers.unique_name("doctor-node")
    create_ready_node(dra_kube_client, name)
    info = {"kubeletVersion": "v1.33.4", "containerRuntimeVersion": "containerd://1.7.20"}
    helpers.merge_patch(kube_api, f"/api/v1/nodes/{name}/status", {"status": {"nodeInfo": info}})
    try:
        settings = DoctorSettings(
            node_name=name,
            kubeconfig=str(control_plane.kubeconfig_path),
            containerd_config=tmp_path / "no-config.toml",
            runtime_socket=tmp_path / "no-containerd.sock",
            **node_dirs,
        )
        report = run_doctor(settings, from_objects("fake", fake_plugin.FakePlugin))
    finally:
        helpers.delete_node(kube_api, name)
    sections = {s.title: {c.name: c for c in s.checks} for s in report.sections}
    # The checks of features depend on the release's gates (checked by
    # test_the_session_api_server_features_are_found_with_one_dry_run).
    warned = release_warnings(control_plane.k8s_version, control_plane.enabled_gates())
    api = sections["API server"].values()
    assert {c.name for c in api if c.status != "ok"} <= warned
    kubelet = sections["kubelet"]["kubelet version"]
    assert kubelet.status == "warn"
    assert kubelet.found == (
        "kubelet v1.33.4 speaks the DRA gRPC API v1beta1 only, which the agent serves too"
    )
    runtime = sections["container runtime"]
    assert runtime["container runtime"].found == f"containerd 1.7.20 (from the Node {name})"
    assert runtime["CDI"].status == "fail"  # no configuration: 1.7's default, off
    assert report.exit_code == 1


def test_a_node_name_the_cluster_does_not_know_fails(control_plane, node_dirs):
    settings = DoctorSettings(
        node_name="no-such-node", kubeconfig=str(control_plane.kubeconfig_path), **node_dirs
    )
    report = run_doctor(settings, from_objects("fake", fake_plugin.FakePlugin))
    kubelet = {c.name: c for s in report.sections if s.title == "kubelet" for c in s.checks}
    check = kubelet["Node no-such-node"]
    assert (check.status, check.found) == ("fail", "not found")
    assert "--node-name (NODE_NAME)" in check.fix

"""The chart with the i915 backend on the real node: the agent pod runs on a fake sysfs tree
whose ``/dev/dri`` nodes are real character devices, mounted into it at the same path, and a
workload pod with a whole-GPU claim gets the GPU's DRM nodes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane import helpers
from tests.deploy.helmcli import HelmError
from tests.realnode import pods
from tests.realnode.helm_release import agent_pods, install_or_upgrade, node_slices, values

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

GPU = "gpu.intel.com"
A770 = "0000:08:00.0"  # Arc A770, a whole GPU
B580 = "0000:0a:00.0"  # Arc B580 on xe


@pytest.fixture
def gpu_tree() -> Iterator:
    if os.geteuid() != 0:
        pytest.skip("character devices for the fake GPUs need root")
    from dra_backend_i915.testing import GIB, FakeSysfs

    base = Path(tempfile.mkdtemp(prefix="dra-helm-i915-", dir="/tmp"))
    tree = FakeSysfs(base, char_devices=True)
    tree.add_simpledrm()  # card0 without a render node, as on hosts
    tree.add_gpu(A770, "0x56a0", bridge="0000:00:1c.0", lmem_total_bytes=16 * GIB)
    tree.add_gpu(B580, "0xe20b", bridge="0000:00:1d.0", driver="xe", lmem_total_bytes=12 * GIB)
    yield tree
    shutil.rmtree(base, ignore_errors=True)


def _dri_numbers(tree, address: str) -> dict[str, tuple[int, int]]:
    """Container path -> major:minor of the host node, for the GPU's card and render node and
    their by-path links."""
    numbers = {}
    for kind in ("card", "render"):
        link = tree.dev / "dri" / "by-path" / f"pci-{address}-{kind}"
        st = os.stat(link)
        found = (os.major(st.st_rdev), os.minor(st.st_rdev))
        numbers[f"/dev/dri/by-path/pci-{address}-{kind}"] = found
        numbers[f"/dev/dri/{os.readlink(link).rsplit('/', 1)[1]}"] = found
    return numbers


@pytest.mark.timeout(900)
def test_helm_install_with_the_i915_backend_on_a_fake_sysfs_tree(
    helm, agent_image, real_node, control_plane, kube_api, namespace, gpu_tree
):
    real_node.import_image(agent_image.archive)
    base = str(gpu_tree.sys.parent)
    chart_values = {
        **values(agent_image, real_node, control_plane, backend="i915"),
        "backendOptions": {"sysfs-root": str(gpu_tree.sys), "devfs-root": str(gpu_tree.dev)},
        "nodeLabels": [],  # no Node Feature Discovery labels on the test node
        "extraVolumes": [{"name": "gpu-tree", "hostPath": {"path": base, "type": "Directory"}}],
        "extraVolumeMounts": [{"name": "gpu-tree", "mountPath": base}],
    }
    release = "gpus"
    install_or_upgrade(
        helm, "install", release, namespace, chart_values, control_plane, kube_api, real_node
    )
    installed = True
    try:
        (agent,) = agent_pods(kube_api, namespace)
        args = agent["spec"]["containers"][0]["args"]
        assert f"--sysfs-root={gpu_tree.sys}" in args, args
        slices = helpers.wait_for(
            lambda: node_slices(kube_api, real_node.name, GPU), 60, "the agent's slices"
        )
        published = {d["name"] for s in slices for d in s["spec"].get("devices") or ()}
        assert {"gpu-0000-08-00-0", "gpu-0000-0a-00-0"} <= published, published

        selectors = [{"cel": {"expression": f'device.attributes["{GPU}"].pciAddress == "{A770}"'}}]
        pods.create_template(
            kube_api, namespace, pods.claim_template("whole", GPU, "gpu", selectors=selectors)
        )
        pods.start(kube_api, namespace, real_node, "workload", pods.from_template("whole", "gpu"))
        (uid,) = pods.claim_uids(kube_api, namespace, "workload").values()
        view = pods.container_view(real_node, namespace, "workload")
        pods.assert_sees(view, pods.cdi_edits(real_node.cdi_dir, uid))
        expected = _dri_numbers(gpu_tree, A770)
        for path, numbers in expected.items():
            assert view.devices.get(path) == numbers, f"{path}: {view.devices.get(path)}"
        others = {p for p in view.devices if p.startswith("/dev/dri/")} - set(expected)
        assert not others, f"the container sees DRM nodes of other GPUs: {sorted(others)}"
        helpers.delete_pod(kube_api, namespace, "workload")
        helpers.wait_for(
            lambda: not any(uid in p.name for p in real_node.cdi_dir.glob("*.json")),
            60,
            "the workload's claim to be unprepared",
        )

        helm.run(
            "uninstall", release, "--namespace", namespace, "--wait",
            kubeconfig=control_plane.kubeconfig_path,
        )  # fmt: skip
        installed = False
        helpers.wait_for(lambda: not agent_pods(kube_api, namespace), 90, "the agent to stop")
        helpers.wait_for(lambda: not node_slices(kube_api, real_node.name, GPU), 90, "slices to go")
        assert not list(real_node.registration_dir.glob(f"{GPU}-*")), "registration socket left"
    finally:
        if installed:
            with contextlib.suppress(HelmError):
                helm.run(
                    "uninstall", release, "--namespace", namespace,
                    kubeconfig=control_plane.kubeconfig_path,
                )  # fmt: skip

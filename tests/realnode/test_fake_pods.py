"""Pods on a real kubelet and containerd get the fake backend's devices through CDI.

Every test reads what the container saw (its environment and character devices) from the
pod's log and compares it with the CDI spec the agent wrote for its claim.
"""

from __future__ import annotations

import signal

import pytest
from dra_backend_fake.testing import write_control

from dra_core.releases import k8s_minor
from tests.controlplane import helpers
from tests.realnode import pods

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]

FAKE = "fake.dra-core.dev"


def spec_gone(node, uid: str) -> bool:
    return not any(uid in p.name for p in node.cdi_dir.glob("*.json"))


def test_template_claim_reaches_the_container_and_is_released(
    fake_agent, fake_device_nodes, real_node, kube_api, namespace
):
    pods.create_template(
        kube_api, namespace, pods.claim_template("one", FAKE, selectors=pods.plain_fake_device(0))
    )
    pods.start(kube_api, namespace, real_node, "first", pods.from_template("one"))
    (uid,) = pods.claim_uids(kube_api, namespace, "first").values()
    edits = pods.cdi_edits(real_node.cdi_dir, uid)
    assert edits.env["DRA_FAKE_DEVICES"] == "dev-0"
    assert "/dev/fake/dev-0" in edits.device_nodes
    view = pods.container_view(real_node, namespace, "first")
    pods.assert_sees(view, edits)

    helpers.delete_pod(kube_api, namespace, "first")
    helpers.wait_for(
        lambda: spec_gone(real_node, uid), 60, "the claim unprepared (CDI spec removed)"
    )
    assert not (fake_device_nodes / uid).exists()

    pods.start(kube_api, namespace, real_node, "second", pods.from_template("one"))
    assert pods.container_view(real_node, namespace, "second").env["DRA_FAKE_DEVICES"] == "dev-0"


@pytest.mark.requires_feature("DRAPartitionableDevices", "DRAConsumableCapacity")
def test_partition_share_and_two_claims_in_one_pod(fake_agent, real_node, kube_api, namespace):
    pods.create_template(
        kube_api, namespace, pods.claim_template("part", f"partition.{FAKE}", request_name="part")
    )
    pods.create_template(
        kube_api, namespace,
        pods.claim_template("share", f"shared.{FAKE}", request_name="share",
                            capacity={"requests": {"memory": "1Gi", "millicores": "250"}}),
    )  # fmt: skip
    claims = {
        "part": {"resourceClaimTemplateName": "part"},
        "share": {"resourceClaimTemplateName": "share"},
    }
    pods.start(kube_api, namespace, real_node, "both", claims)
    uids = pods.claim_uids(kube_api, namespace, "both")
    part, share = (pods.cdi_edits(real_node.cdi_dir, uids[n]) for n in ("part", "share"))
    view = pods.container_view(real_node, namespace, "both")

    assert part.env["DRA_FAKE_DEVICE_PART"].startswith("big-0-p")
    assert share.env["DRA_FAKE_SHARE_ID_SHARED_0"]
    assert share.env["DRA_FAKE_CONSUMED_SHARED_0_MEMORY"] == "1Gi"
    # Variables named after the request or device are each claim's own; the container has
    # them all, and the device nodes of both claims.
    for edits in (part, share):
        own = {
            k: v for k, v in edits.env.items() if k not in ("DRA_FAKE_DEVICES", "DRA_FAKE_CLAIM")
        }
        pods.assert_sees(view, pods.CdiEdits(env=own, device_nodes=edits.device_nodes))
    assert len(part.device_nodes) == len(share.device_nodes) == 1


def test_one_claim_shared_by_two_pods(fake_agent, real_node, kube_api, namespace):
    pods.create_claim(kube_api, namespace, "common", FAKE, selectors=pods.plain_fake_device(1))
    for name in ("a", "b"):
        helpers.create_pod(
            kube_api,
            namespace,
            pods.pod_body(name, real_node.name, {"dev": {"resourceClaimName": "common"}}),
        )
    for name in ("a", "b"):
        pods.wait_running(kube_api, namespace, name)
    uid = helpers.get_resource_claim(kube_api, namespace, "common")["metadata"]["uid"]
    edits = pods.cdi_edits(real_node.cdi_dir, uid)
    for name in ("a", "b"):
        pods.assert_sees(pods.container_view(real_node, namespace, name), edits)

    helpers.delete_pod(kube_api, namespace, "a")
    helpers.wait_for(lambda: not _pod_exists(kube_api, namespace, "a"), 60, "pod a gone")
    assert not spec_gone(real_node, uid), "the claim was unprepared while pod b still uses it"
    assert pods.phase(kube_api, namespace, "b")[0] == "Running"
    helpers.delete_pod(kube_api, namespace, "b")
    helpers.wait_for(
        lambda: spec_gone(real_node, uid), 60, "the claim unprepared after the last pod"
    )


def _pod_exists(api, namespace: str, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        helpers.get_pod(api, namespace, name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@pytest.mark.requires_feature("ResourceHealthStatus")
def test_device_health_reaches_the_pod_status(
    fake_agent, fake_control, real_node, control_plane, kube_api, namespace
):
    # How the kubelet finds a container's claim for its health differs by release: 1.34 looks
    # it up by the pod's entry name (a claim named as the entry), 1.35 only through the pod
    # status's claim statuses (claims made from a template); 1.36 on finds both. So the test
    # uses the form its release's kubelet finds: a template from 1.35 on.
    selectors = pods.plain_fake_device(2)
    if k8s_minor(control_plane.k8s_version) == 34:
        pods.create_claim(kube_api, namespace, "dev", FAKE, selectors=selectors)
        claim = {"resourceClaimName": "dev"}
    else:
        pods.create_template(
            kube_api, namespace, pods.claim_template("dev", FAKE, selectors=selectors)
        )
        claim = {"resourceClaimTemplateName": "dev"}
    pods.start(kube_api, namespace, real_node, "watched", {"dev": claim})

    def health() -> dict[str, str]:
        status = helpers.get_pod(kube_api, namespace, "watched")["status"]
        return {
            r["resourceID"]: r.get("health", "")
            for c in status.get("containerStatuses", [])
            for entry in c.get("allocatedResourcesStatus") or []
            for r in entry.get("resources") or []
        }

    helpers.wait_for(
        lambda: "Healthy" in health().values(), 30, "the device Healthy in the pod status"
    )
    write_control(fake_control, {"unhealthy": {"dev-2": "fan on fire"}})
    helpers.wait_for(
        lambda: "Unhealthy" in health().values(), 30, "the device Unhealthy in the pod status"
    )
    (resource,) = health()
    assert resource.endswith("dev-2"), resource
    write_control(fake_control, {})
    helpers.wait_for(lambda: set(health().values()) == {"Healthy"}, 30, "the device Healthy again")


def test_agent_restart_keeps_pods_and_releases_what_was_deleted_meanwhile(
    fake_agent, real_node, kube_api, namespace
):
    pods.create_template(kube_api, namespace, pods.claim_template("one", FAKE))
    for name in ("stays", "goes"):
        helpers.create_pod(
            kube_api,
            namespace,
            pods.pod_body(name, real_node.name, {"dev": {"resourceClaimTemplateName": "one"}}),
        )
    for name in ("stays", "goes"):
        pods.wait_running(kube_api, namespace, name)
    stays = pods.claim_uids(kube_api, namespace, "stays")["dev"]
    goes = pods.claim_uids(kube_api, namespace, "goes")["dev"]

    fake_agent.stop(signal.SIGKILL)
    helpers.delete_pod(kube_api, namespace, "goes")
    fake_agent.start()

    helpers.wait_for(lambda: spec_gone(real_node, goes), 90, "the deleted pod's claim unprepared")
    helpers.wait_for(lambda: not _pod_exists(kube_api, namespace, "goes"), 60, "pod goes removed")
    pod = helpers.get_pod(kube_api, namespace, "stays")
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    assert not spec_gone(real_node, stays)
    pods.assert_sees(
        pods.container_view(real_node, namespace, "stays"), pods.cdi_edits(real_node.cdi_dir, stays)
    )


def slice_uids(api, node: str) -> set[str]:
    items = helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node}"},
    )["items"]
    return {s["metadata"]["uid"] for s in items if s["spec"]["driver"] == FAKE}


def test_kubelet_restart_slices_come_back(fake_agent, real_node, kube_api, namespace):
    helpers.wait_for(lambda: slice_uids(kube_api, real_node.name), 30, "the fake slices published")
    before = slice_uids(kube_api, real_node.name)
    real_node.restart_kubelet()
    helpers.wait_for(
        lambda: (now := slice_uids(kube_api, real_node.name)) and not now & before,
        60,
        "the kubelet's deletion of the node's slices undone by the agent",
    )
    pods.create_template(kube_api, namespace, pods.claim_template("one", FAKE))
    pods.start(kube_api, namespace, real_node, "after", pods.from_template("one"))

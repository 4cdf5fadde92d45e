"""`dra-core run --backend fake` as an operator runs it, driven through its control file:
hotplug, health taints and the kubelet health stream, injected failures, clean shutdown."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from dra_backend_fake.testing import write_control

from dra_core import ClaimRef
from dra_core.testing.agent import RunningAgent
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

DRIVER = "fake.dra-core.dev"
TAINT = f"{DRIVER}/unhealthy"


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "control.yaml"


@pytest.fixture
def agent(dra_agent, kube_api, control) -> Iterator[RunningAgent]:
    helpers.create_device_class(kube_api, DRIVER, driver=DRIVER)
    try:
        yield dra_agent(
            "fake",
            process=True,
            options={"devices": "4", "control_file": str(control), "control_interval": "0.2"},
        )
    finally:
        helpers.delete_device_class(kube_api, DRIVER)


def published(api, node: str) -> dict[str, dict]:
    """The devices of the node's pool at its newest generation, by name."""
    slices = helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={node}"},
    )["items"]
    if not slices:
        return {}
    newest = max(s["spec"]["pool"]["generation"] for s in slices)
    return {
        d["name"]: d
        for s in slices
        if s["spec"]["pool"]["generation"] == newest
        for d in s["spec"].get("devices", [])
    }


def test_control_file_drives_slices_health_and_failures(
    agent, dra_kubelet, control, control_plane, kube_api, namespace
):
    node = agent.node
    helpers.wait_for(
        lambda: set(published(kube_api, node)) == {f"dev-{i}" for i in range(4)},
        20,
        "dev-0..dev-3 published",
    )

    hot = {"message": "too hot", "effect": "NoExecute", "reason": "Overheating", "taint": "thermal"}
    write_control(control, {"unhealthy": {"dev-1": "fan on fire", "dev-2": hot}})
    if control_plane.enabled_gates().get("DRADeviceTaints", False):
        helpers.wait_for(
            lambda: any(
                t["key"] == TAINT and t["effect"] == "NoSchedule"
                for t in published(kube_api, node)["dev-1"].get("taints", [])
            ),
            20,
            "the unhealthy device tainted in its ResourceSlice",
        )
        # the backend's taint name and reason, accepted by the API server as published
        (taint,) = published(kube_api, node)["dev-2"]["taints"]
        assert (taint["key"], taint.get("value"), taint["effect"]) == (
            f"{DRIVER}/thermal",
            "Overheating",
            "NoExecute",
        )
    else:  # no taint would keep the scheduler away: the agent leaves the device out
        helpers.wait_for(
            lambda: "dev-1" not in published(kube_api, node),
            20,
            "the unhealthy device left out",
        )
    with agent.kubelet() as kubelet:
        (message,) = kubelet.read_health(1, timeout=10)
        health = {r.device: r for r in message}
        assert health["dev-1"].healthy is False and "fan on fire" in health["dev-1"].message
        assert health["dev-0"].healthy is True

    write_control(control, {"add": [{"name": "hot-0"}], "remove": ["dev-3"]})
    helpers.wait_for(
        lambda: set(published(kube_api, node)) == {"dev-0", "dev-1", "dev-2", "hot-0"},
        20,
        "hot-0 added and dev-3 removed",
    )
    assert not published(kube_api, node)["dev-1"].get("taints"), "recovered: the taint is gone"

    claim = helpers.create_resource_claim(
        kube_api, namespace, helpers.resource_claim_body("one", DRIVER)
    )
    pod = helpers.pod_body("pod-0", [{"name": "dev", "resourceClaimName": "one"}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    helpers.create_pod(kube_api, namespace, pod)
    allocated = helpers.wait_for_claim_allocated(kube_api, namespace, "one")
    device = allocated["status"]["allocation"]["devices"]["results"][0]["device"]
    write_control(control, {"failPrepare": {device: "injected failure"}})
    ref = ClaimRef(namespace, "one", claim["metadata"]["uid"])
    kubelet = dra_kubelet(agent)
    helpers.wait_for(
        lambda: "injected failure" in kubelet.prepare([ref])[ref.uid].error,
        10,
        "the injected prepare failure",
    )
    write_control(control, {})
    helpers.wait_for(
        lambda: kubelet.prepare([ref])[ref.uid].error == "",
        10,
        "prepare to succeed once the failure is lifted",
    )
    assert kubelet.unprepare([ref]) == {ref.uid: ""}

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(20) == 0, agent.log_tail()
    assert not agent.registration_socket.exists(), "a clean stop removes its own sockets"

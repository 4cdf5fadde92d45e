"""`dra-core run --backend fake` as an operator runs it, driven through its control file:
hotplug, health taints and the kubelet health stream, injected failures, clean shutdown."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dra_core import ClaimRef
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

NODE = "fake-agent-node"
DRIVER = "fake.dra-core.dev"
TAINT = f"{DRIVER}/unhealthy"


class RunningAgent:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes], control: Path) -> None:
        self.root = root
        self.proc = proc
        self.control = control
        self.registration = root / "registry" / f"{DRIVER}-reg.sock"

    def set_control(self, content: dict) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(content))
        tmp.replace(self.control)

    def log(self) -> str:
        return (self.root / "agent.log").read_text()[-4000:]


@pytest.fixture
def agent(control_plane, kube_api, dra_kube_client) -> Iterator[RunningAgent]:
    create_ready_node(dra_kube_client, NODE)
    helpers.create_device_class(kube_api, DRIVER, driver=DRIVER)
    root = Path(tempfile.mkdtemp(prefix="dra-fake-", dir="/tmp"))
    control = root / "control.yaml"
    argv = [
        sys.executable,
        "-m",
        "dra_core",
        "--log-level",
        "DEBUG",
        "run",
        "--backend",
        "fake",
        "--devices",
        "4",
        "--control-file",
        str(control),
        "--control-interval",
        "0.2",
        "--node-name",
        NODE,
        "--kubeconfig",
        str(control_plane.kubeconfig_path),
        "--registration-dir",
        str(root / "registry"),
        "--plugins-dir",
        str(root / "plugins"),
        "--cdi-dir",
        str(root / "cdi"),
        "--http-port",
        "0",
        "--poll-interval",
        "0.5",
    ]
    with (root / "agent.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    running = RunningAgent(root, proc, control)
    try:
        helpers.wait_for(
            lambda: running.registration.exists() or proc.poll() is not None,
            30,
            "the agent's registration socket",
        )
        assert proc.poll() is None, running.log()
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        helpers.delete_node(kube_api, NODE)
        helpers.delete_device_class(kube_api, DRIVER)
        shutil.rmtree(root, ignore_errors=True)


def published(api) -> dict[str, dict]:
    """The devices of the node's pool at its newest generation, by name."""
    slices = helpers.get(
        api,
        f"{helpers.RESOURCE_API}/resourceslices",
        query={"fieldSelector": f"spec.nodeName={NODE}"},
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


def test_control_file_drives_slices_health_and_failures(agent, control_plane, kube_api, namespace):
    helpers.wait_for(
        lambda: set(published(kube_api)) == {f"dev-{i}" for i in range(4)},
        20,
        "dev-0..dev-3 published",
    )

    hot = {"message": "too hot", "effect": "NoExecute", "reason": "Overheating", "taint": "thermal"}
    agent.set_control({"unhealthy": {"dev-1": "fan on fire", "dev-2": hot}})
    if control_plane.enabled_gates().get("DRADeviceTaints", False):
        helpers.wait_for(
            lambda: any(
                t["key"] == TAINT and t["effect"] == "NoSchedule"
                for t in published(kube_api)["dev-1"].get("taints", [])
            ),
            20,
            "the unhealthy device tainted in its ResourceSlice",
        )
        # the backend's taint name and reason, accepted by the API server as published
        (taint,) = published(kube_api)["dev-2"]["taints"]
        assert (taint["key"], taint.get("value"), taint["effect"]) == (
            f"{DRIVER}/thermal",
            "Overheating",
            "NoExecute",
        )
    else:  # no taint would keep the scheduler away: the agent leaves the device out
        helpers.wait_for(
            lambda: "dev-1" not in published(kube_api), 20, "the unhealthy device left out"
        )
    with FakeKubelet(agent.registration) as kubelet:
        kubelet.register()
        (message,) = kubelet.read_health(1, timeout=10)
        health = {r.device: r for r in message}
        assert health["dev-1"].healthy is False and "fan on fire" in health["dev-1"].message
        assert health["dev-0"].healthy is True

    agent.set_control({"add": [{"name": "hot-0"}], "remove": ["dev-3"]})
    helpers.wait_for(
        lambda: set(published(kube_api)) == {"dev-0", "dev-1", "dev-2", "hot-0"},
        20,
        "hot-0 added and dev-3 removed",
    )
    assert not published(kube_api)["dev-1"].get("taints"), "recovered: the taint is gone"

    claim = helpers.create_resource_claim(
        kube_api, namespace, helpers.resource_claim_body("one", DRIVER)
    )
    pod = helpers.pod_body("pod-0", [{"name": "dev", "resourceClaimName": "one"}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(kube_api, namespace, pod)
    allocated = helpers.wait_for_claim_allocated(kube_api, namespace, "one")
    device = allocated["status"]["allocation"]["devices"]["results"][0]["device"]
    agent.set_control({"failPrepare": {device: "injected failure"}})
    ref = ClaimRef(namespace, "one", claim["metadata"]["uid"])
    with FakeKubelet(agent.registration) as kubelet:
        kubelet.register()
        helpers.wait_for(
            lambda: "injected failure" in kubelet.prepare([ref])[ref.uid].error,
            10,
            "the injected prepare failure",
        )
        agent.set_control({})
        helpers.wait_for(
            lambda: kubelet.prepare([ref])[ref.uid].error == "",
            10,
            "prepare to succeed once the failure is lifted",
        )
        assert kubelet.unprepare([ref]) == {ref.uid: ""}

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(20) == 0, agent.log()
    assert not agent.registration.exists(), "a clean stop removes its own sockets"

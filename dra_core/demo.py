"""``dra-core demo``: the whole DRA flow on one machine, with real Kubernetes components.

It starts a local control plane (etcd, kube-apiserver, kube-scheduler,
kube-controller-manager), runs the node agent on a backend (the fake one by default) against
it, lets the real scheduler allocate a device to a pod, prepares the claim through the agent's
kubelet socket as the kubelet would, shows the CDI spec a container runtime would get, and
cleans everything up.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dra_core.kube.client import KubeClient, load_client
from dra_core.manifests import device_class_manifests
from dra_core.model import ClaimRef
from dra_core.plugins import Hooks
from dra_core.runtime import Agent, AgentSettings
from dra_core.testing.controlplane import ControlPlane, find_binaries
from dra_core.testing.kubelet import FakeKubelet

__all__ = ("run_demo",)

NODE = "demo-node"
NAMESPACE = "default"
RESOURCE_API = "/apis/resource.k8s.io/v1"
T = TypeVar("T")


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def _wait(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    msg = f"timed out after {timeout:.0f} s waiting for {what}"
    raise DemoError(msg)


def _node() -> dict[str, Any]:
    capacity = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Demo",
                    "message": "no kubelet: the demo plays its part",
                }
            ],
        },
    }


def _create_node(client: KubeClient) -> None:
    """A Node with no kubelet behind it, Ready and schedulable.

    Without the node-lifecycle controller nothing lifts the not-ready taint every new node
    gets, so the demo reports the node Ready itself and clears the taints.
    """
    body = _node()
    client.request("POST", "/api/v1/nodes", body=body)
    merge = "application/merge-patch+json"
    client.request(
        "PATCH", f"/api/v1/nodes/{NODE}/status", body={"status": body["status"]}, content_type=merge
    )
    client.request(
        "PATCH", f"/api/v1/nodes/{NODE}", body={"spec": {"taints": None}}, content_type=merge
    )


def run_demo(hooks: Hooks, say: Callable[[str], None] = print) -> None:
    """Run the demo with the loaded backend, reporting each step through ``say``."""
    steps = 7

    def step(n: int, text: str) -> None:
        say(f"[{n}/{steps}] {text}")

    step(1, "control-plane binaries (built from Go modules on first use, then cached) ...")
    binaries = find_binaries()
    say(f"      {binaries}")
    step(2, "starting etcd, kube-apiserver, kube-scheduler, kube-controller-manager ...")
    work = Path(tempfile.mkdtemp(prefix="dra-demo-", dir="/tmp"))
    started = time.monotonic()
    with ControlPlane(binaries=binaries) as plane:
        say(f"      API server {plane.server} ready in {time.monotonic() - started:.1f} s")
        client = load_client(str(plane.kubeconfig_path))
        try:
            _demo_with_cluster(hooks, client, work, step, say)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say("done: control plane stopped, temporary files removed")


def _demo_with_cluster(
    hooks: Hooks,
    client: KubeClient,
    work: Path,
    step: Callable[[int, str], None],
    say: Callable[[str], None],
) -> None:
    identity = hooks.backend_identity()
    classes = device_class_manifests(hooks.device_classes(identity))
    if not classes:
        msg = f"backend {hooks.backend!r} declares no DeviceClass to request a device with"
        raise DemoError(msg)
    step(
        3,
        f"node {NODE!r} and the backend's DeviceClasses: "
        f"{', '.join(c['metadata']['name'] for c in classes)}",
    )
    _create_node(client)
    for body in classes:
        client.request("POST", f"{RESOURCE_API}/deviceclasses", body=body)

    step(
        4, f"starting the node agent (backend {hooks.backend!r}, driver {identity.driver_name}) ..."
    )
    settings = AgentSettings(
        node_name=NODE,
        registration_dir=work / "plugins_registry",
        plugins_dir=work / "plugins",
        cdi_dir=work / "cdi",
        http_port=0,
        poll_interval=1.0,
    )
    agent = Agent(settings, hooks, client=client)
    started = time.monotonic()
    agent.start()
    try:
        assert agent.plugin is not None
        with FakeKubelet(agent.plugin.registration_socket) as kubelet:
            kubelet.register()
            say(
                f"      registered with the kubelet {1000 * (time.monotonic() - started):.0f} ms "
                "after start"
            )
            slices = _wait(
                "the agent's ResourceSlices",
                lambda: client.get(
                    f"{RESOURCE_API}/resourceslices",
                    query={"fieldSelector": f"spec.nodeName={NODE}"},
                )["items"],
            )
            devices = sum(len(s["spec"].get("devices", [])) for s in slices)
            say(f"      published {devices} devices in {len(slices)} ResourceSlices")
            _claim_and_prepare(
                client, kubelet, classes[0]["metadata"]["name"], settings.cdi_dir, step, say
            )
    finally:
        agent.stop()


def _claim_and_prepare(
    client: KubeClient,
    kubelet: FakeKubelet,
    device_class: str,
    cdi_dir: Path,
    step: Callable[[int, str], None],
    say: Callable[[str], None],
) -> None:
    claims = f"{RESOURCE_API}/namespaces/{NAMESPACE}/resourceclaims"
    step(5, f"a pod with a ResourceClaim for one device of class {device_class!r} ...")
    claim = client.request(
        "POST",
        claims,
        body={
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "demo-claim"},
            "spec": {
                "devices": {
                    "requests": [{"name": "device", "exactly": {"deviceClassName": device_class}}]
                }
            },
        },
    )
    client.request(
        "POST",
        f"/api/v1/namespaces/{NAMESPACE}/pods",
        body={
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "demo-pod"},
            "spec": {
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "app",
                        "image": "registry.k8s.io/pause:3.10",
                        "resources": {"claims": [{"name": "device"}]},
                    }
                ],
                "resourceClaims": [{"name": "device", "resourceClaimName": "demo-claim"}],
            },
        },
    )
    pod = _wait(
        "the scheduler to bind the pod",
        lambda: client.get(f"/api/v1/namespaces/{NAMESPACE}/pods/demo-pod")["spec"].get("nodeName"),
    )
    allocated = _wait(
        "the claim's allocation",
        lambda: client.get(f"{claims}/demo-claim").get("status", {}).get("allocation"),
    )
    result = allocated["devices"]["results"][0]
    say(f"      scheduled on {pod}; allocated device {result['device']} of pool {result['pool']}")

    step(6, "the kubelet asks the agent to prepare the claim ...")
    ref = ClaimRef(NAMESPACE, "demo-claim", claim["metadata"]["uid"])
    prepared = kubelet.prepare([ref])[ref.uid]
    if prepared.error:
        raise DemoError(prepared.error)
    for device in prepared.devices:
        say(f"      {device.device_name}: CDI devices {', '.join(device.cdi_device_ids) or 'none'}")
    for spec_file in sorted(cdi_dir.glob("*.json")):
        say(f"      CDI spec {spec_file.name}:")
        for line in json.dumps(json.loads(spec_file.read_text()), indent=2).splitlines():
            say(f"        {line}")

    step(7, "the pod is gone: the kubelet asks the agent to unprepare the claim ...")
    errors = kubelet.unprepare([ref])
    if errors[ref.uid]:
        raise DemoError(errors[ref.uid])
    say("      unprepared; the CDI spec is removed")

"""``dra-core demo``: the whole DRA flow on one machine, with real Kubernetes components.

It provides the control-plane binaries (built from their Go modules on first use, with the
build's progress shown as it goes), starts a local control plane (etcd, kube-apiserver,
kube-scheduler, kube-controller-manager), runs the node agent on a backend (the fake one by
default, with the backend's options as ``dra-core run`` takes them) against it, lets the real
scheduler allocate a device to a pod, prepares the claim through the agent's kubelet socket as
the kubelet would, shows the CDI spec a container runtime would get, and cleans everything up.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dra_core.kube.client import KubeClient, load_client
from dra_core.manifests import device_class_manifests
from dra_core.model import BackendIdentity
from dra_core.plugins import Hooks
from dra_core.runtime import Agent, AgentSettings, resolve_identity
from dra_core.testing.controlplane import BUILD_SCRIPT, ControlPlane, run_build_script
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import (
    RESOURCE_API,
    claim_body,
    claim_ref,
    create_ready_node,
    pod_body,
    published_slices,
    wait_for,
)

__all__ = ("DemoError", "provide_binaries", "run_demo")

NODE = "demo-node"
NAMESPACE = "default"
T = TypeVar("T")
#: Seconds without a line from the build script after which the demo says it is still building.
QUIET_BUILD_INTERVAL = 30.0


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def _wait(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    try:
        return wait_for(what, check, timeout)
    except TimeoutError as exc:
        raise DemoError(str(exc)) from None


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}:{rest:02d}"


def provide_binaries(
    say: Callable[[str], None],
    script: Path = BUILD_SCRIPT,
    quiet_interval: float = QUIET_BUILD_INTERVAL,
) -> Path:
    """The control-plane binaries from ``script`` (cached, prebuilt or built now).

    Each progress line of the script is passed to ``say`` as it comes, after the time elapsed
    since the start; when the script says nothing for ``quiet_interval`` seconds (a Go build
    step runs for minutes), ``say`` is told it is still building.
    """
    started = time.monotonic()
    last_line = [started]
    lock = threading.Lock()
    finished = threading.Event()

    def report(line: str) -> None:
        with lock:
            now = time.monotonic()
            last_line[0] = now
            say(f"      {_clock(now - started)} {line}")

    def still_building() -> None:
        while not finished.wait(quiet_interval / 4):
            with lock:
                now = time.monotonic()
                if now - last_line[0] >= quiet_interval:
                    last_line[0] = now
                    say(f"      {_clock(now - started)} ... still building")

    watcher = threading.Thread(target=still_building, name="demo-build-progress", daemon=True)
    watcher.start()
    try:
        return run_build_script(script, progress=report)
    finally:
        finished.set()
        watcher.join()


def run_demo(
    hooks: Hooks,
    say: Callable[[str], None] = print,
    backend_options: Mapping[str, str | None] | None = None,
    driver_name: str | None = None,
) -> None:
    """Run the demo with the loaded backend, reporting each step through ``say``.

    ``backend_options`` are the backend's option values by name with ``_`` for ``-`` (as
    ``dra-core run`` passes them), e.g. ``{"sysfs_root": "/tmp/node/sys"}`` for i915;
    ``driver_name`` overrides the backend's driver name, as ``--driver-name`` does for ``run``.
    """
    identity = resolve_identity(hooks, driver_name)  # a bad name fails before the build
    steps = 7

    def step(n: int, text: str) -> None:
        say(f"[{n}/{steps}] {text}")

    step(1, "control-plane binaries (built from Go modules on first use, then cached) ...")
    binaries = provide_binaries(say)
    say(f"      {binaries}")
    step(2, "starting etcd, kube-apiserver, kube-scheduler, kube-controller-manager ...")
    work = Path(tempfile.mkdtemp(prefix="dra-demo-", dir="/tmp"))
    started = time.monotonic()
    with ControlPlane(binaries=binaries) as plane:
        say(f"      API server {plane.server} ready in {time.monotonic() - started:.1f} s")
        client = load_client(str(plane.kubeconfig_path))
        try:
            gates = plane.enabled_gates()  # only the classes this release accepts
            settings = AgentSettings.below(
                work,
                NODE,
                driver_name=driver_name,
                poll_interval=1.0,
                backend_options=dict(backend_options or {}),
            )
            _demo_with_cluster(hooks, identity, client, gates, settings, step, say)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say("done: control plane stopped, temporary files removed")


def _describe_slices(slices: list[dict[str, Any]]) -> str:
    devices = sum(len(s["spec"].get("devices") or ()) for s in slices)
    counter_sets = sum(len(s["spec"].get("sharedCounters") or ()) for s in slices)
    pools = sorted(
        {
            f"{s['spec']['pool']['name']} generation {s['spec']['pool']['generation']}"
            for s in slices
        }
    )
    counted = f"{devices} device{'s' * (devices != 1)}"
    if counter_sets:
        counted += f" and {counter_sets} counter set{'s' * (counter_sets != 1)}"
    return (
        f"published {counted} in {len(slices)} ResourceSlice{'s' * (len(slices) != 1)} "
        f"(pool {', '.join(pools)})"
    )


def _demo_with_cluster(
    hooks: Hooks,
    identity: BackendIdentity,
    client: KubeClient,
    gates: dict[str, bool],
    settings: AgentSettings,
    step: Callable[[int, str], None],
    say: Callable[[str], None],
) -> None:
    classes = device_class_manifests(
        hooks.device_classes(identity, settings.backend_options), gates
    )
    if not classes:
        msg = f"backend {hooks.backend!r} declares no DeviceClass to request a device with"
        raise DemoError(msg)
    step(
        3,
        f"node {NODE!r} and the backend's DeviceClasses: "
        f"{', '.join(c['metadata']['name'] for c in classes)}",
    )
    create_ready_node(client, NODE)
    for body in classes:
        client.request("POST", f"{RESOURCE_API}/deviceclasses", body=body)

    step(
        4, f"starting the node agent (backend {hooks.backend!r}, driver {identity.driver_name}) ..."
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
                lambda: published_slices(client, NODE, identity.driver_name),
            )
            say(f"      {_describe_slices(slices)}")
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
    claim = client.request("POST", claims, body=claim_body("demo-claim", device_class))
    pod_spec = pod_body("demo-pod", [{"name": "device", "resourceClaimName": "demo-claim"}])
    client.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", body=pod_spec)
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
    ref = claim_ref(claim)
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

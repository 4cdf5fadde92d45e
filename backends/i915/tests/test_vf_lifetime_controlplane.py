"""VFs of one GPU, made once for every claim that needs them, with the real scheduler.

A node agent serves a fake node with one Flex 170 (partitioned with its default profile
``flex170_m8``). The real scheduler allocates VFs from the slices the agent publishes, and the
claims are prepared through the agent's kubelet socket: one claim with two VFs, two claims in
one kubelet call, two calls at the same time. Every shape makes the 8 VFs once and removes them
with the last claim, after which the whole GPU is published and allocatable again.

The last test runs the agent in its own process and kills it right after it wrote
``sriov_numvfs``: the fake kernel lives in the test process (served to the agent on a unix
socket), so it outlives the agent and finishes the VFs, as a real kernel does. The restarted
agent knows them as its own and removes them when the claim is released.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from dra_backend_i915.discovery import vf_address
from dra_backend_i915.testing import GIB, FakeKernel, FakeSysfs

from backends.i915.tests import controlplane_helpers as cp
from dra_core import ClaimRef
from dra_core.checkpoint import Checkpoint
from dra_core.testing.agent import RunningAgent, start_agent
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

# VFs made on demand are published only with partitionable devices on.
pytestmark = [pytest.mark.controlplane, pytest.mark.requires_feature("DRAPartitionableDevices")]
pytest_plugins = ["tests.controlplane.fixtures"]

NODE = "i915-vf-node"
CRASH_NODE = "i915-vf-crash-node"
STATE = Path("plugins") / cp.DRIVER / "backend" / "i915-state.json"
CRASH_AGENT = Path(__file__).with_name("vf_crash_agent.py")


def flex_node(base: Path) -> FakeSysfs:
    fake = FakeSysfs(base, char_devices=os.geteuid() == 0)
    fake.add_gpu(
        cp.FLEX, "0x56c0", lmem_total_bytes=16 * GIB, sriov_totalvfs=31, error_counters=True
    )
    return fake


@pytest.fixture(scope="module")
def fs(short_dir: Path) -> FakeSysfs:
    return flex_node(short_dir / "node")


short_dir, kernel, backend, hooks, classes, agent, kubelet = cp.agent_fixtures("dra-i915-vf-", NODE)


def partitioned_flex_published(api, node: str) -> bool:
    """The Flex as this driver's partitionable GPU: the PF and its 8 VFs with their profile."""
    devices = cp.published(api, node)
    return set(devices) == {cp.FLEX_DEVICE, *cp.FLEX_VFS} and all(
        devices[name]["attributes"]["profile"] == {"string": "flex170_m8"} for name in cp.FLEX_VFS
    )


def vf_claim(api, namespace: str, name: str, node: str = NODE, count: int = 1) -> ClaimRef:
    return cp.claim_with_pod(
        api, namespace, cp.claim_body(name, f"vf.{cp.DRIVER}", count=count), node
    )


def numvfs_writes(kernel: FakeKernel, since: int) -> list[str]:
    return [v for p, v in kernel.writes[since:] if p.endswith("/sriov_numvfs")]


def saved_state(root: Path) -> dict[str, Any]:
    return json.loads((root / STATE).read_text())


def render_env(fs: FakeSysfs, root: Path, ref: ClaimRef, device: str, cdi_id: str) -> None:
    """The claim's CDI spec gives ``device`` the render node of its own VF."""
    edits = cp.edits_of(cp.cdi_spec(root, ref), cdi_id)
    vf = fs.gpus[vf_address(cp.FLEX, 1, 1, cp.FLEX_VFS.index(device))]
    assert f"DRI_RENDER_NODE=/dev/dri/{vf.render}" in edits["env"]


def whole_flex_is_allocatable(api, namespace: str, kubelet: FakeKubelet, node: str) -> None:
    """A claim for the whole Flex gets it and prepares: no VF is left over."""
    ref = cp.claim_with_pod(
        api,
        namespace,
        cp.claim_body("whole", cp.DRIVER, selectors=[cp.on(cp.FLEX)]),
        node,
    )
    assert cp.allocated_devices(api, ref) == [cp.FLEX_DEVICE]
    assert kubelet.prepare([ref])[ref.uid].error == ""
    assert kubelet.unprepare([ref]) == {ref.uid: ""}
    cp.release(api, ref)


def test_one_claim_with_two_vfs(agent, kubelet, kube_api, namespace, fs, kernel, short_dir):
    ref = vf_claim(kube_api, namespace, "two", count=2)
    devices = cp.allocated_devices(kube_api, ref)
    assert len(devices) == 2 and set(devices) <= set(cp.FLEX_VFS)
    assert cp.numvfs(fs) == 0, "no VF exists before the prepare"

    since = len(kernel.writes)
    answer = kubelet.prepare([ref])[ref.uid]
    assert answer.error == ""
    assert sorted(d.device_name for d in answer.devices) == devices
    assert numvfs_writes(kernel, since) == ["8"], "the VFs are made once, for both devices"
    assert saved_state(short_dir)["created"] == {
        cp.FLEX: {"profile": "flex170_m8", "numVfs": 8, "complete": True}
    }
    for device in answer.devices:
        render_env(fs, short_dir, ref, device.device_name, device.cdi_device_ids[0])

    assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert numvfs_writes(kernel, since) == ["8", "0"]
    assert cp.numvfs(fs) == 0
    assert saved_state(short_dir) == {"version": 1, "created": {}, "holders": {}}
    cp.release(kube_api, ref)
    helpers.wait_for(
        lambda: partitioned_flex_published(kube_api, NODE), 15, "the Flex published again"
    )
    whole_flex_is_allocatable(kube_api, namespace, kubelet, NODE)


def test_two_claims_in_one_call(agent, kubelet, kube_api, namespace, fs, kernel, short_dir):
    refs = [vf_claim(kube_api, namespace, f"one-{i}") for i in range(2)]
    devices = [cp.allocated_devices(kube_api, ref)[0] for ref in refs]
    assert len(set(devices)) == 2

    since = len(kernel.writes)
    answers = kubelet.prepare(refs)
    assert [answers[ref.uid].error for ref in refs] == ["", ""]
    assert numvfs_writes(kernel, since) == ["8"]
    holders = saved_state(short_dir)["holders"]
    assert holders == {device: [ref.uid] for device, ref in zip(devices, refs, strict=True)}
    for ref, device in zip(refs, devices, strict=True):
        (prepared,) = answers[ref.uid].devices
        render_env(fs, short_dir, ref, device, prepared.cdi_device_ids[0])

    assert kubelet.unprepare([refs[0]]) == {refs[0].uid: ""}
    assert cp.numvfs(fs) == 8, "the other claim still uses a VF of the Flex"
    assert kubelet.unprepare([refs[1]]) == {refs[1].uid: ""}
    assert numvfs_writes(kernel, since) == ["8", "0"]
    assert cp.numvfs(fs) == 0
    for ref in refs:
        cp.release(kube_api, ref)
    helpers.wait_for(
        lambda: partitioned_flex_published(kube_api, NODE), 15, "the Flex published again"
    )


class Gate:
    """A writer that holds the first VF creation until the test lets it go on."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.creating = threading.Event()
        self.go_on = threading.Event()

    def write(self, path: Path, value: str) -> None:
        if path.name == "sriov_numvfs" and value != "0" and not self.creating.is_set():
            self.creating.set()
            if not self.go_on.wait(60):
                raise OSError(errno.ETIMEDOUT, "the test never let the VF creation go on")
        self.kernel.write(path, value)


def test_two_calls_at_once(
    agent, backend, kubelet, kube_api, namespace, fs, kernel, short_dir, monkeypatch
):
    refs = [vf_claim(kube_api, namespace, f"at-once-{i}") for i in range(2)]
    devices = [cp.allocated_devices(kube_api, ref)[0] for ref in refs]

    # The second call arrives while the first is making the VFs: the first holds the
    # writer at sriov_numvfs until the agent has taken in the second call.
    gate = Gate(kernel)
    monkeypatch.setattr(backend, "writer", gate)
    calls = threading.Semaphore(0)
    service = agent.service
    prepare = service.prepare

    def counted(claims, deadline=None):
        calls.release()
        return prepare(claims, deadline)

    monkeypatch.setattr(service, "prepare", counted)
    since = len(kernel.writes)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(kubelet.prepare, [refs[0]])
        assert gate.creating.wait(30), "the first call did not start making the VFs"
        second = pool.submit(kubelet.prepare, [refs[1]])
        assert calls.acquire(timeout=30) and calls.acquire(timeout=30)
        gate.go_on.set()
        answers = {**first.result(60), **second.result(60)}
    assert [answers[ref.uid].error for ref in refs] == ["", ""]
    assert [answers[ref.uid].devices[0].device_name for ref in refs] == devices
    assert numvfs_writes(kernel, since) == ["8"]

    assert kubelet.unprepare([refs[1]]) == {refs[1].uid: ""}
    assert cp.numvfs(fs) == 8
    assert kubelet.unprepare([refs[0]]) == {refs[0].uid: ""}
    assert cp.numvfs(fs) == 0
    assert saved_state(short_dir) == {"version": 1, "created": {}, "holders": {}}
    for ref in refs:
        cp.release(kube_api, ref)


# -- the agent dies between the VF write and the record ----------------------------------------


class KernelServer:
    """Serves a fake kernel's writes on a unix socket, for an agent in another process."""

    def __init__(self, kernel: FakeKernel, path: Path) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = json.loads(self.rfile.readline())
                try:
                    kernel.write(Path(request["path"]), request["value"])
                    code = 0
                except OSError as exc:
                    code = exc.errno or errno.EIO
                self.wfile.write(json.dumps({"errno": code}).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KernelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def phases(agent: RunningAgent) -> dict[str, str]:
    """The phase of each claim the agent's checkpoint records."""
    path = agent.settings.plugin_dir(agent.driver) / "checkpoint.json"
    return {uid: record.phase for uid, record in Checkpoint.open(path).records().items()}


@pytest.fixture
def crash_node(kube_api, dra_kube_client, classes) -> Iterator[str]:
    create_ready_node(dra_kube_client, CRASH_NODE)
    yield CRASH_NODE
    helpers.delete_node(kube_api, CRASH_NODE)


def test_agent_dies_between_the_vf_write_and_the_record(
    control_plane, kube_api, namespace, crash_node, monkeypatch
):
    root = Path(tempfile.mkdtemp(prefix="dra-i915-crash-", dir="/tmp"))
    node = flex_node(root / "node")
    kernel = node.kernel(delay=0.05)
    monkeypatch.setenv("I915_TEST_KERNEL", str(root / "kernel.sock"))
    agent = start_agent(
        "i915",
        root=root,
        node=crash_node,
        kubeconfig=str(control_plane.kubeconfig_path),
        options={"sysfs_root": str(node.sys), "devfs_root": str(node.dev)},
        process=True,
        driver=cp.DRIVER,
        start=False,
    )
    program = (str(CRASH_AGENT),)
    try:
        with KernelServer(kernel, root / "kernel.sock"):
            monkeypatch.setenv("CRASH_AT", "after-sriov-numvfs")
            agent.start(program=program)
            helpers.wait_for(
                lambda: partitioned_flex_published(kube_api, crash_node), 30, "the slices"
            )
            ref = vf_claim(kube_api, namespace, "crash", node=crash_node)
            (device,) = cp.allocated_devices(kube_api, ref)
            with agent.kubelet() as kubelet, pytest.raises(grpc.RpcError):  # the agent died
                kubelet.prepare([ref])
            assert agent.proc is not None
            assert agent.proc.wait(30) == 137, agent.log_tail()
            kernel.join()  # the kernel finishes the VFs the dead agent asked for
            assert cp.numvfs(node) == 8
            assert saved_state(root)["created"] == {
                cp.FLEX: {"profile": "flex170_m8", "numVfs": 8, "complete": False}
            }, "the intent to make the VFs was on disk before sriov_numvfs was written"
            assert phases(agent) == {ref.uid: "started"}

            # Restarted: the claim half prepared is rolled back, and with it go the VFs,
            # which the agent knows as its own (an administrator's would stay).
            monkeypatch.delenv("CRASH_AT")
            agent.start(program=program)
            helpers.wait_for(
                lambda: phases(agent) == {} and cp.numvfs(node) == 0,
                30,
                "the interrupted claim rolled back and its VFs removed",
            )
            assert saved_state(root) == {"version": 1, "created": {}, "holders": {}}
            assert partitioned_flex_published(kube_api, crash_node)

            # The kubelet's retry makes them again; released, they go.
            with agent.kubelet() as kubelet:
                answer = kubelet.prepare([ref])[ref.uid]
                assert answer.error == "", agent.log_tail()
                assert [d.device_name for d in answer.devices] == [device]
                assert cp.numvfs(node) == 8
                assert saved_state(root)["created"][cp.FLEX]["complete"] is True
                assert kubelet.unprepare([ref]) == {ref.uid: ""}
            assert cp.numvfs(node) == 0
            assert [v for p, v in kernel.writes if p.endswith("/sriov_numvfs")] == [
                "8",
                "0",
                "8",
                "0",
            ]
            cp.release(kube_api, ref)
            agent.stop()
    finally:
        agent.stop()
        kernel.join()
        shutil.rmtree(root, ignore_errors=True)

"""Pytest plugin: a real node (containerd, runc, kubelet) for tests marked ``realnode``.

Registered from ``tests/conftest.py``. Fixtures:
  * ``real_node_binaries`` (session): the directory of the node's binaries.
  * ``real_node`` (session): a started :class:`dra_core.testing.node.Node` registered with the
    session's control plane, stopped at the end (which fails if the host is left changed).
  * ``pod_network_node`` (session): a node with a pod network (pods in their own network
    namespaces) and a control plane of its own, listening on the network's gateway where the
    pods reach it (``node.control_plane``); made only for the tests that ask for it.
  * ``fake_agent`` (function): ``dra-core run --backend fake`` on that node, as an operator runs
    it, with a control file and device nodes; the fake DeviceClasses exist.

The node's binaries are provided before the first test (``node-build.sh``: a cached build, or
``DRA_TEST_NODE_BINARIES``); the first build takes several minutes and shows its progress.
Without root or a Go toolchain these tests skip, except in CI, where they fail. The kubelet
is of the release ``DRA_K8S_VERSION`` selects, as the control plane is, with the same gates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dra_core.manifests import device_class_manifests
from dra_core.testing.controlplane import (
    BinariesUnavailable,
    ControlPlane,
    selected_k8s_version,
)
from dra_core.testing.node import Node, PodNetwork, find_node_binaries
from tests.controlplane import helpers
from tests.realnode.agent_image import AgentImage, ImageUnavailable, build_agent_image

MARKER = "realnode"
FAKE_DRIVER = "fake.dra-core.dev"
_STATE: dict = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "realnode: runs pods on a real node (kubelet, containerd, runc); needs root"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provide the node's binaries once, before any test (and its timeout) starts."""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker(MARKER) for item in session.items):
        return
    if os.geteuid() != 0:
        _STATE["error"] = "a real node needs root (the kubelet and containerd run as root)"
        return
    if not os.environ.get("DRA_TEST_NODE_BINARIES") and shutil.which("go") is None:
        _STATE["error"] = (
            "node binaries unavailable: DRA_TEST_NODE_BINARIES is not set and no Go toolchain "
            "is on PATH to build them (dra_core/testing/node-build.sh)"
        )
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    say = tr.write_line if tr is not None else print
    say("[realnode] providing binaries via dra_core/testing/node-build.sh ...")
    t0 = time.monotonic()
    try:
        _STATE["binaries"] = find_node_binaries(progress=say, version=selected_k8s_version())
    except (BinariesUnavailable, ValueError) as e:
        _STATE["error"] = str(e)
    say(f"[realnode] binaries: {_STATE.get('binaries', 'FAILED')} ({time.monotonic() - t0:.1f}s)")


def _skip_or_fail(msg: str) -> None:
    if _in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def real_node_binaries() -> Path:
    if "binaries" not in _STATE:
        _skip_or_fail(_STATE.get("error", "node binaries were not provided"))
    binaries: Path = _STATE["binaries"]
    return binaries


@pytest.fixture(scope="session")
def agent_image(request) -> AgentImage:
    """The agent's image from deploy/Dockerfile (built once per source tree, then cached)."""
    if os.geteuid() != 0:
        _skip_or_fail("building the agent image needs root (buildah)")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    try:
        return build_agent_image(say=tr.write_line if tr is not None else print)
    except ImageUnavailable as e:
        _skip_or_fail(f"the agent image cannot be built here: {e}")
        raise


@pytest.fixture(scope="session")
def real_node(control_plane, real_node_binaries) -> Iterator[Node]:
    if "start_error" in _STATE:
        pytest.fail(_STATE["start_error"], pytrace=False)
    node = Node(control_plane, real_node_binaries, name="dra-real-node")
    t0 = time.monotonic()
    try:
        node.start()
    except Exception as e:  # noqa: BLE001 - reported once, for every test that needs it
        _STATE["start_error"] = f"the real node failed to start: {e}"
        pytest.fail(_STATE["start_error"], pytrace=False)
    _STATE["start_seconds"] = time.monotonic() - t0
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def pod_network_node(control_plane, real_node_binaries) -> Iterator[Node]:
    # The session's control plane listens on loopback, which pods in their own network cannot
    # reach: this node gets one of its own, of the same release and gates, on its gateway.
    with contextlib.ExitStack() as stack:
        try:
            network = stack.enter_context(PodNetwork())
            plane = stack.enter_context(
                ControlPlane(
                    control_plane.binaries,
                    k8s_version=control_plane.k8s_version,
                    gates=control_plane.gates,
                    bind_address=network.gateway,
                )
            )
            node = stack.enter_context(
                Node(plane, real_node_binaries, name="dra-pod-network-node", pod_network=network)
            )
        except Exception as e:  # noqa: BLE001 - a clear failure for the test that needs it
            pytest.fail(f"the node with a pod network failed to start: {e}", pytrace=False)
        yield node


class AgentProcess:
    """``dra-core run`` for one backend on the real node, restartable."""

    def __init__(self, node: Node, kubeconfig: Path, backend: str, *args: str) -> None:
        self.node = node
        self.backend = backend
        self.root = Path(tempfile.mkdtemp(prefix=f"dra-{backend}-", dir="/tmp"))
        self.control = self.root / "control.yaml"
        self.argv = [
            sys.executable, "-m", "dra_core", "--log-level", "DEBUG", "run",
            "--backend", backend,
            "--node-name", node.name,
            "--kubeconfig", str(kubeconfig),
            "--registration-dir", str(node.registration_dir),
            "--plugins-dir", str(node.plugins_dir),
            "--cdi-dir", str(node.cdi_dir),
            "--http-port", "0",
            "--poll-interval", "0.5",
            *args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        helpers.wait_for(
            lambda: self.registered() or self.proc.poll() is not None,
            30,
            f"the {self.backend} agent's registration socket",
        )
        assert self.proc.poll() is None, self.log()

    def registered(self) -> bool:
        return any(self.node.registration_dir.glob("*-reg.sock"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def set_control(self, content: dict) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(content))
        tmp.replace(self.control)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def fake_device_classes(control_plane, kube_api) -> Iterator[None]:
    from dra_backend_fake import DRIVER_NAME, plugin

    every = plugin.device_classes(DRIVER_NAME)
    # Only the classes the release accepts: shared.* needs DRAConsumableCapacity.
    classes = device_class_manifests(every, control_plane.enabled_gates())
    created: list[str] = []
    try:
        # A class the release refuses must not leave the ones created before it behind.
        for body in classes:
            helpers.create(kube_api, f"{helpers.RESOURCE_API}/deviceclasses", body)
            created.append(body["metadata"]["name"])
        yield
    finally:
        for name in created:
            helpers.delete_device_class(kube_api, name)


@pytest.fixture
def fake_agent(real_node, control_plane, fake_device_classes) -> Iterator[AgentProcess]:
    agent = AgentProcess(real_node, control_plane.kubeconfig_path, "fake")
    agent.argv += [
        "--control-file", str(agent.control),
        "--control-interval", "0.2",
        "--device-nodes-dir", str(agent.root / "dev"),
    ]  # fmt: skip
    agent.start()
    try:
        yield agent
    finally:
        agent.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if "start_seconds" in _STATE:
        terminalreporter.write_line(f"[realnode] node started in {_STATE['start_seconds']:.1f}s")

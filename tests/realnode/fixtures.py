"""Pytest plugin: the project's names for the real node of the shipped pytest plugin
(dra_core.testing.plugin: binaries provided before the first test marked ``realnode``, the node
itself, skipped without root, failing in CI), and what only the project's tests need.

Registered from ``tests/conftest.py``. Fixtures:
  * ``real_node_binaries`` (session): ``dra_real_node_binaries``, the node's binaries.
  * ``real_node`` (session): ``dra_real_node``, a started :class:`dra_core.testing.node.Node`
    registered with the session's control plane, stopped at the end (which fails if the host
    is left changed).
  * ``pod_network_node`` (session): a node with a pod network (pods in their own network
    namespaces) and a control plane of its own, listening on the network's gateway where the
    pods reach it (``node.control_plane``); made only for the tests that ask for it.
  * ``agent_image`` (session): the agent's image from deploy/Dockerfile.
  * ``fake_agent`` (function): ``dra-core run --backend fake`` on that node, as an operator runs
    it (``dra_agent`` with ``process=True``), with a control file (``fake_control``) and device
    nodes (in ``fake_device_nodes``); the fake DeviceClasses exist.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_core.manifests import device_class_manifests
from dra_core.testing.agent import RunningAgent
from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.node import Node, PodNetwork
from dra_core.testing.plugin import skip_or_fail
from tests.controlplane import helpers
from tests.realnode.agent_image import AgentImage, ImageUnavailable, build_agent_image

FAKE_DRIVER = "fake.dra-core.dev"


@pytest.fixture(scope="session")
def real_node_binaries(dra_real_node_binaries: Path) -> Path:
    return dra_real_node_binaries


@pytest.fixture(scope="session")
def real_node(dra_real_node: Node) -> Node:
    return dra_real_node


@pytest.fixture(scope="session")
def agent_image(request) -> AgentImage:
    """The agent's image from deploy/Dockerfile (built once per source tree, then cached)."""
    if os.geteuid() != 0:
        skip_or_fail("building the agent image needs root (buildah)")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    try:
        return build_agent_image(say=tr.write_line if tr is not None else print)
    except ImageUnavailable as e:
        skip_or_fail(f"the agent image cannot be built here: {e}")


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
def fake_control(tmp_path: Path) -> Path:
    """The fake agent's control file (``dra_backend_fake.testing.write_control`` writes it)."""
    return tmp_path / "control.yaml"


@pytest.fixture
def fake_device_nodes(tmp_path: Path) -> Path:
    """Where the fake agent creates a device node per prepared device."""
    return tmp_path / "dev"


@pytest.fixture
def fake_agent(
    dra_agent, real_node, fake_device_classes, fake_control, fake_device_nodes
) -> RunningAgent:
    return dra_agent(
        "fake",
        node=real_node.name,
        process=True,
        registration_dir=real_node.registration_dir,
        plugins_dir=real_node.plugins_dir,
        cdi_dir=real_node.cdi_dir,
        options={
            "control_file": str(fake_control),
            "control_interval": "0.2",
            "device_nodes_dir": str(fake_device_nodes),
        },
    )

"""The kit's control-plane fixtures as a backend's project uses them: a test file of its own run
by pytest (pytester, in a subprocess, so the plugin comes from its ``pytest11`` entry point)
against a control plane of that run. What each fixture promises is asserted inside, and so is
what it leaves behind after its test."""

from __future__ import annotations

import os
import pwd

import pytest

pytestmark = pytest.mark.controlplane

USER_TESTS = """
import pytest

from dra_core import BackendIdentity, Device, Inventory, hookimpl
from dra_core.kube.client import ApiError
from dra_core.model import ClaimRef
from dra_core.testing.scenario import published_slices, wait_for

pytestmark = pytest.mark.controlplane
DRIVER = "tiny.example.com"
SEEN = {}


class Tiny:
    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "example.com", "tiny")

    @hookimpl
    def dra_discover(self, context):
        return Inventory(devices=(Device("dev-0"),))


def gone(client, path):
    try:
        client.request("GET", path)
    except ApiError as exc:
        return exc.not_found
    return False


def test_ready_node(dra_ready_node, dra_kube_client):
    node = dra_kube_client.request("GET", f"/api/v1/nodes/{dra_ready_node}")
    assert not node["spec"].get("taints")
    assert {"type": "Ready", "status": "True"}.items() <= node["status"]["conditions"][0].items()
    SEEN["node"] = dra_ready_node


def test_ready_node_is_deleted_after_its_test(dra_kube_client):
    assert gone(dra_kube_client, f"/api/v1/nodes/{SEEN['node']}")


def test_agent_of_backend_objects(dra_agent, dra_kubelet, dra_kube_client):
    agent = dra_agent(Tiny, name="tiny")
    assert agent.agent is not None and agent.registration_socket.is_socket()
    assert agent.settings.node_name == agent.node and agent.driver == DRIVER
    kubelet = dra_kubelet(agent)
    assert kubelet.info.name == DRIVER
    ref = ClaimRef("default", "never-prepared", "0b6a3a48-0d37-4c0f-9a3e-4a2f6b7c1d2e")
    assert kubelet.unprepare([ref]) == {ref.uid: ""}
    slices = wait_for(
        "the slices", lambda: published_slices(dra_kube_client, agent.node, DRIVER), 30
    )
    assert [d["name"] for s in slices for d in s["spec"]["devices"]] == ["dev-0"]
    SEEN["agent"], SEEN["kubelet"] = agent, kubelet


def test_agent_kubelet_and_node_are_gone_after_their_test(dra_kube_client):
    agent, kubelet = SEEN["agent"], SEEN["kubelet"]
    assert agent.agent is None, "the agent was not stopped"
    assert not agent.root.exists(), "the agent's directory was left behind"
    assert not kubelet._channels, "the kubelet's channels were left open"
    assert gone(dra_kube_client, f"/api/v1/nodes/{agent.node}")


def test_agent_of_an_installed_backend_on_a_given_node(dra_agent, dra_ready_node, dra_kubelet):
    agent = dra_agent("fake", node=dra_ready_node, options={"devices": "2"})
    assert agent.node == dra_ready_node
    assert dra_kubelet(agent).info.name == "fake.dra-core.dev"


def test_agent_as_a_process(dra_agent, dra_kubelet):
    agent = dra_agent("fake", process=True, options={"devices": "1"})
    assert agent.proc is not None and agent.proc.poll() is None
    assert dra_kubelet(agent).info.name == "fake.dra-core.dev"
    SEEN["process"] = agent.proc


def test_process_is_stopped_after_its_test():
    assert SEEN["process"].poll() is not None
"""


def test_fixtures_in_a_project_of_their_own(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytester points HOME to its own directory, where no cached build of the binaries is:
    # the user's HOME keeps the run from building them again.
    monkeypatch.setenv("HOME", pwd.getpwuid(os.getuid()).pw_dir)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", timeout=240)
    result.assert_outcomes(passed=7)

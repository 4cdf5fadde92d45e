"""The kit of dra_core.testing as a backend's project gets it: the pytest plugin loaded from its
``pytest11`` entry point in a pytest run of its own (pytester), and the fake API server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dra_core.kube.client import ApiError
from dra_core.testing.agent import backend_flags
from dra_core.testing.fakeapi import SLICES, FakeApi

KIT_FIXTURES = (
    "dra_control_plane",
    "dra_kube_client",
    "dra_namespace",
    "dra_ready_node",
    "dra_agent",
    "dra_kubelet",
    "dra_real_node",
)


def test_the_installed_plugin_gives_the_fixtures(pytester: pytest.Pytester) -> None:
    # A subprocess: only the entry point can have registered the plugin there.
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.assert_outcomes()
    listed = result.stdout.str()
    assert "fixtures defined from dra_core.testing.plugin" in listed, listed
    missing = [name for name in KIT_FIXTURES if f"\n{name} " not in listed]
    assert not missing, f"fixtures not offered by the installed plugin: {missing}\n{listed}"


def test_real_node_without_its_binaries_is_skipped_naming_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRA_TEST_NODE_BINARIES", raising=False)
    monkeypatch.delenv("CI", raising=False)  # in CI the test would fail instead, as it should
    without_go = [d for d in os.environ["PATH"].split(os.pathsep) if not Path(d, "go").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(without_go))
    pytester.makepyfile(
        test_node="""
        import pytest

        @pytest.mark.realnode
        def test_pods(dra_real_node):
            raise AssertionError("ran without a real node")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", timeout=60)
    result.assert_outcomes(skipped=1)
    why = "node binaries unavailable" if os.geteuid() == 0 else "a real node needs root"
    result.stdout.fnmatch_lines([f"*{why}*"])
    assert "[controlplane]" not in result.stdout.str(), "a control plane was started for nothing"


def test_backend_options_become_run_flags() -> None:
    flags = backend_flags({"control_file": "/tmp/c.yaml", "devices": "2", "inventory": None})
    assert flags == ["--control-file", "/tmp/c.yaml", "--devices", "2"]


def test_fake_api_refuses_what_it_does_not_serve() -> None:
    api = FakeApi()
    with pytest.raises(AssertionError, match=r"does not serve GET /api/v1/pods.*dra_control_plane"):
        api.request("GET", "/api/v1/pods")


def test_fake_api_conflicts_and_failures_as_the_server_has_them() -> None:
    api = FakeApi()
    body = {"metadata": {"name": "s1"}, "spec": {"nodeName": "n", "driver": "d", "devices": []}}
    created = api.request("POST", SLICES, body=body)
    with pytest.raises(ApiError) as exists:
        api.request("POST", SLICES, body=body)
    assert exists.value.status == 409
    stale = {**created, "metadata": {**created["metadata"], "resourceVersion": "1"}}
    with pytest.raises(ApiError) as modified:
        api.request("PUT", f"{SLICES}/s1", body=stale)
    assert modified.value.status == 409
    api.failures.append(ApiError("GET", SLICES, 500, "injected"))
    with pytest.raises(ApiError, match="injected"):
        api.get(SLICES)
    assert (
        api.get(SLICES, {"fieldSelector": "spec.nodeName=n"})["items"][0]["metadata"]
        == (created["metadata"])
    )

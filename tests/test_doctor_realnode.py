"""``dra-core doctor`` on the real test node: its kubelet, its containerd (asked over its CRI
socket) and its directories, as an operator runs the command on a node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dra_core.doctor.cluster import release_warnings

pytestmark = [pytest.mark.controlplane, pytest.mark.realnode]


def doctor(real_node, control_plane, *args: str) -> tuple[int, dict[str, dict]]:
    argv = [
        sys.executable, "-m", "dra_core", "doctor", "--output", "json",
        "--backend", "fake",
        "--node-name", real_node.name,
        "--kubeconfig", str(control_plane.kubeconfig_path),
        "--registration-dir", str(real_node.registration_dir),
        "--plugins-dir", str(real_node.plugins_dir),
        "--containerd-config", str(real_node.workdir / "containerd" / "config.toml"),
        "--runtime-socket", str(real_node.containerd_socket),
        *args,
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(result.stdout)
    return result.returncode, {
        s["title"]: {c["name"]: c for c in s["checks"]} for s in report["sections"]
    }


def test_the_real_node_has_what_the_agent_needs(real_node, control_plane):
    code, sections = doctor(real_node, control_plane, "--cdi-dir", str(real_node.cdi_dir))
    # A feature whose gate the release has off is rightly a warning (test_doctor_controlplane.py).
    warned = release_warnings(control_plane.k8s_version, control_plane.enabled_gates())
    failed = [
        c
        for s in sections.values()
        for c in s.values()
        if c["status"] != "ok" and c["name"] not in warned
    ]
    assert (code, failed) == (0, [])
    assert sections["kubelet"]["kubelet version"]["found"] == (
        f"kubelet {control_plane.k8s_version} speaks the DRA gRPC API v1"
    )
    runtime = sections["container runtime"]
    assert runtime["container runtime"]["found"] == (
        f"containerd v2.4.2 (from its CRI socket {real_node.containerd_socket})"
    )
    assert runtime["CDI"]["found"] == "always on in containerd 2.4 and later"
    assert runtime["CDI spec directories"]["found"] == (
        f"containerd reads ['{real_node.cdi_dir}'] (the running containerd's configuration, from "
        f"its CRI socket {real_node.containerd_socket}), which holds {real_node.cdi_dir}"
    )


def test_a_cdi_directory_containerd_does_not_read_fails(real_node, control_plane, tmp_path: Path):
    elsewhere = tmp_path / "cdi"
    code, sections = doctor(real_node, control_plane, "--cdi-dir", str(elsewhere))
    dirs = sections["container runtime"]["CDI spec directories"]
    assert (code, dirs["status"]) == (1, "fail")
    assert dirs["found"].startswith(
        f"containerd reads CDI specs from ['{real_node.cdi_dir}'] (the running containerd's "
        f"configuration, from its CRI socket"
    )
    assert f"not from {elsewhere} where the agent writes them" in dirs["found"]

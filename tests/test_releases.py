"""The releases and feature gates `dra-core render` and the test harness choose from."""

from __future__ import annotations

import pytest

from dra_core.releases import (
    DRA_GATE_DEFAULTS,
    ReleaseError,
    default_on_since,
    gate_defaults,
    gates_on,
    k8s_minor,
    parse_feature_gates,
)
from dra_core.testing.controlplane import (
    DRA_GATES,
    release_feature_gates,
    release_runtime_config,
)
from dra_core.testing.controlplane import k8s_minor as harness_minor


@pytest.mark.parametrize(
    ("version", "minor"),
    [("v1.34.4", 34), ("1.35", 35), ("v1.36.0-gke.1200", 36), ("1.36+", 36), ("v1.40.1", 40)],
)
def test_versions_as_clusters_report_them(version, minor):
    assert k8s_minor(version) == minor


@pytest.mark.parametrize(
    ("version", "message"),
    [("v1.33.9", "needs 1.34 or later"), ("2.0.0", "not a Kubernetes release"), ("", "not a")],
)
def test_versions_refused(version, message):
    with pytest.raises(ReleaseError, match=message):
        k8s_minor(version)


def test_the_harness_runs_only_releases_it_knows():
    assert harness_minor("v1.37.2") == 37
    with pytest.raises(ValueError, match=r"the harness supports 1\.34 to 1\.37"):
        harness_minor("v1.38.0")


def test_a_newer_release_has_the_newest_gates_and_a_gate_stays_on():
    assert gate_defaults("v1.41.0") == DRA_GATE_DEFAULTS[37]
    assert default_on_since("DRAConsumableCapacity") == 36
    assert default_on_since("NoSuchGate") is None
    for gate in DRA_GATE_DEFAULTS[37]:
        since = default_on_since(gate)
        if since is not None:
            assert all(DRA_GATE_DEFAULTS[m].get(gate) for m in range(since, 38)), gate


def test_gates_on_and_the_feature_gates_flag():
    assert parse_feature_gates(" A=true, B=False,") == {"A": True, "B": False}
    with pytest.raises(ReleaseError, match="write NAME=true or NAME=false"):
        parse_feature_gates("A=yes")
    on = gates_on("v1.34.4", {"DRAConsumableCapacity": True, "DRADeviceTaintRules": False})
    assert on["DRAConsumableCapacity"] and not on["DRAPartitionableDevices"]
    assert "DRADeviceTaintRules" not in on  # does not exist in 1.34; turning it off is harmless
    with pytest.raises(ReleaseError, match="DRADeviceTaintRules does not exist in Kubernetes"):
        gates_on("v1.34.4", {"DRADeviceTaintRules": True})


@pytest.mark.parametrize("minor", sorted(DRA_GATE_DEFAULTS))
def test_the_harness_gate_sets(minor):
    version = f"v1.{minor}.0"
    assert release_feature_gates(version, "default") == {}
    dra = release_feature_gates(version, "dra")
    assert dra == {g: True for g in DRA_GATES if g in DRA_GATE_DEFAULTS[minor]}
    # Device taints on 1.34 need the alpha API served, or the scheduler lists it for ever.
    config = release_runtime_config(version, dra, ("resource.k8s.io/v1=true",))
    assert ("resource.k8s.io/v1alpha3=true" in config) == (minor == 34)

"""The pytest plugin of ``dra_core.testing``: a real Kubernetes control plane for a DRA driver's
tests. Installed with dra-core (entry point ``pytest11``: ``dra_core``), so any project that
installs ``dra-core[testing]`` has it; ``-p no:dra_core`` turns it off.

Fixtures:

``dra_control_plane`` (session)
    A started :class:`~dra_core.testing.controlplane.ControlPlane` (etcd, kube-apiserver,
    kube-scheduler, kube-controller-manager) shared by the session. Its kubeconfig is
    ``dra_control_plane.kubeconfig_path`` (cluster-admin).
``dra_kube_client`` (session)
    A :class:`~dra_core.kube.client.KubeClient` for it, the client the agent itself uses; the
    scenario functions of :mod:`dra_core.testing.scenario` take it.
``dra_namespace`` (function)
    A fresh namespace with its ``default`` ServiceAccount, deleted afterwards.

Tests that use them are marked ``controlplane`` (``-m "not controlplane"`` deselects them).
The binaries are provided once, before the first test (outside any per-test timeout):
``DRA_TEST_BINARIES`` if it names a directory of prebuilt ones, else a cached build in
``~/.cache/dra-core``, else a build from the Go modules now (about six minutes on two cores;
needs Go). If they cannot be provided the tests fail when ``CI`` is true or a build was tried,
and are skipped with the reason otherwise. The release is ``DRA_K8S_VERSION`` (default: the
project's) and its feature gates ``DRA_TEST_GATES``: ``dra`` (default) turns on the DRA gates
the release has, ``default`` keeps the release's defaults, as most clusters run.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the plugin loads in every pytest session: import the heavy parts lazily
    from dra_core.kube.client import KubeClient
    from dra_core.testing.controlplane import ControlPlane

MARKER = "controlplane"
_STATE: dict[str, Any] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: needs the test Kubernetes control plane (etcd, kube-apiserver, scheduler, "
        "controller-manager); select with -m controlplane, skip with -m 'not controlplane'",
    )
    config.addinivalue_line(
        "markers",
        "requires_feature(*gates): needs these feature gates on in the test control plane; "
        "skipped, naming them, where its API server has one off (DRA_K8S_VERSION, "
        "DRA_TEST_GATES)",
    )


def _release_and_gates() -> tuple[str, str]:
    """The release and gate set chosen by the environment, checked once for the session."""
    from dra_core.testing.controlplane import k8s_minor, selected_gate_set, selected_k8s_version

    version, gates = selected_k8s_version(), selected_gate_set()
    k8s_minor(version)  # raises ValueError for a release the harness does not know
    return version, gates


def _wanted(session: pytest.Session) -> bool:
    return any(item.get_closest_marker(MARKER) for item in session.items)


def pytest_report_header(config: pytest.Config) -> str | None:
    try:
        version, gates = _release_and_gates()
    except ValueError as e:
        return f"controlplane: {e}"
    return f"controlplane: Kubernetes {version}, feature gates: {gates} (DRA_TEST_GATES)"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provide the binaries once, before any test (and its timeout) starts."""
    if session.config.option.collectonly or not _wanted(session):
        return
    from dra_core.testing.controlplane import BinariesUnavailable, find_binaries

    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    try:
        _STATE["k8s_version"], _STATE["gates"] = _release_and_gates()
    except ValueError as e:
        _STATE["error"], _STATE["attempted"] = str(e), True
        return
    if not os.environ.get("DRA_TEST_BINARIES") and shutil.which("go") is None:
        _STATE["error"] = (
            "control-plane binaries unavailable: DRA_TEST_BINARIES is not set and no Go "
            "toolchain is on PATH to build them (dra_core/testing/controlplane-build.sh). "
            "Deselect these tests with -m 'not controlplane'."
        )
        _STATE["attempted"] = False
        return
    if tr is not None:
        tr.write_line(
            "[controlplane] providing binaries via dra_core/testing/controlplane-build.sh "
            "(the first build from source takes a long time) ..."
        )
    started = time.monotonic()
    try:
        _STATE["binaries"] = find_binaries(version=_STATE["k8s_version"])
    except BinariesUnavailable as e:
        _STATE["error"], _STATE["attempted"] = str(e), True
    _STATE["binaries_seconds"] = time.monotonic() - started
    if tr is not None:
        where = _STATE.get("binaries") or "FAILED"
        tr.write_line(f"[controlplane] binaries: {where} ({_STATE['binaries_seconds']:.1f}s)")


def _binaries_or_fail() -> Path:
    from dra_core.testing.controlplane import BinariesUnavailable, find_binaries

    if "binaries" in _STATE:
        return Path(_STATE["binaries"])
    if "error" not in _STATE:  # the fixture used without the collection hook having run
        try:
            _STATE["k8s_version"], _STATE["gates"] = _release_and_gates()
            _STATE["binaries"] = find_binaries(version=_STATE["k8s_version"])
            return Path(_STATE["binaries"])
        except (BinariesUnavailable, ValueError) as e:
            _STATE["error"], _STATE["attempted"] = str(e), True
    msg = _STATE["error"]
    if _in_ci() or _STATE.get("attempted"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def dra_control_plane() -> Iterator[ControlPlane]:
    """A started control plane shared by the session (see the module's documentation)."""
    from dra_core.testing.controlplane import ControlPlane

    binaries = _binaries_or_fail()
    if "start_error" in _STATE:  # don't retry a failed start for every test
        pytest.fail(_STATE["start_error"], pytrace=False)
    plane = ControlPlane(
        binaries=binaries, k8s_version=_STATE["k8s_version"], gates=_STATE["gates"]
    )
    try:
        plane.start()
    except Exception as e:  # noqa: BLE001 - every later test gets the same clear failure
        _STATE["start_error"] = f"control plane failed to start: {e}"
        pytest.fail(_STATE["start_error"], pytrace=False)
    _STATE["start_seconds"] = plane.startup_seconds
    try:
        yield plane
    finally:
        started = time.monotonic()
        plane.stop()
        _STATE["stop_seconds"] = time.monotonic() - started


@pytest.fixture(scope="session")
def dra_kube_client(dra_control_plane: ControlPlane) -> KubeClient:
    """The agent's own API client (plain JSON in and out) for the control plane."""
    from dra_core.kube.client import load_client

    return load_client(str(dra_control_plane.kubeconfig_path))


@pytest.fixture
def dra_namespace(dra_control_plane: ControlPlane, dra_kube_client: KubeClient) -> Iterator[str]:
    """A fresh namespace with its ``default`` ServiceAccount, deleted after the test."""
    from dra_core.testing.scenario import create_namespace, delete_namespace

    name = create_namespace(
        dra_kube_client,
        f"dra-test-{uuid.uuid4().hex[:8]}",
        service_account=dra_control_plane.want_controller_manager,
    )
    try:
        yield name
    finally:
        delete_namespace(dra_kube_client, name)


@pytest.fixture(autouse=True)
def _dra_requires_feature(request: pytest.FixtureRequest) -> None:
    """Skip a test marked ``requires_feature`` when the running API server (asked, not assumed
    from the release) has one of its gates off."""
    marker = request.node.get_closest_marker("requires_feature")
    if marker is None:
        return
    plane: ControlPlane = request.getfixturevalue("dra_control_plane")
    missing = plane.missing_gates(*marker.args)
    if missing:
        pytest.skip(
            f"needs the feature gate {', '.join(missing)}, off in Kubernetes "
            f"{plane.k8s_version} with DRA_TEST_GATES={plane.gates}"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not any(k in _STATE for k in ("binaries_seconds", "start_seconds")):
        return
    parts = []
    if "binaries_seconds" in _STATE:
        state = "ready" if "binaries" in _STATE else "UNAVAILABLE"
        parts.append(f"binaries {state} after {_STATE['binaries_seconds']:.1f}s")
    if "start_seconds" in _STATE:
        parts.append(f"started in {_STATE['start_seconds']:.1f}s")
    if "stop_seconds" in _STATE:
        parts.append(f"stopped in {_STATE['stop_seconds']:.1f}s")
    terminalreporter.write_line("[controlplane] " + ", ".join(parts))

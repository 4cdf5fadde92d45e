"""Pytest plugin: a real control plane for tests marked ``controlplane``.

Registered from ``tests/conftest.py`` with ``pytest_plugins = ["tests.controlplane.fixtures"]``.

Fixtures:
  * ``control_plane`` (session): a started :class:`ControlPlane` (etcd, kube-apiserver,
    kube-scheduler, kube-controller-manager), shared by the whole session.
  * ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for it (system:masters).
  * ``namespace`` (function): a fresh namespace (with its ``default`` ServiceAccount), deleted
    afterwards.

Binaries are provided before the first test runs (in ``pytest_collection_finish``, outside any
per-test timeout) by ``build.sh``: ``DRA_TEST_BINARIES`` if set, else a cached build, else a
fresh build (long on the first run). If they cannot be provided, controlplane tests FAIL when
``CI`` is true or a build was attempted and failed; a developer without a Go toolchain gets a
skip with a message. Deselect them with ``-m "not controlplane"``.

The Kubernetes release is ``DRA_K8S_VERSION`` (default: the project's, v1.37.2) and its
feature gates ``DRA_TEST_GATES``: ``dra`` (the default) turns on the DRA gates the release has,
``default`` leaves the release's defaults, as most clusters run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from dra_core.testing.controlplane import (
    BinariesUnavailable,
    ControlPlane,
    find_binaries,
    k8s_minor,
    selected_gate_set,
    selected_k8s_version,
)
from tests.controlplane import helpers

MARKER = "controlplane"
_STATE: dict = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    # Registered in pyproject.toml too; registering here keeps the plugin usable on its own.
    config.addinivalue_line(
        "markers",
        "controlplane: needs the test Kubernetes control plane (etcd, kube-apiserver, "
        "scheduler, controller-manager)",
    )


def _release_and_gates() -> tuple[str, str]:
    """The release and gate set chosen by the environment, checked once for the session."""
    version, gates = selected_k8s_version(), selected_gate_set()
    k8s_minor(version)  # raises ValueError for a release the harness does not know
    return version, gates


def pytest_report_header(config: pytest.Config) -> str:
    try:
        version, gates = _release_and_gates()
    except ValueError as e:
        return f"controlplane: {e}"
    return f"controlplane: Kubernetes {version}, feature gates: {gates} (DRA_TEST_GATES)"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provide the binaries once, before any test (and its timeout) starts."""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker(MARKER) for item in session.items):
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    try:
        _STATE["k8s_version"], _STATE["gates"] = _release_and_gates()
    except ValueError as e:
        _STATE["error"], _STATE["attempted"] = str(e), True
        return
    can_build = bool(os.environ.get("DRA_TEST_BINARIES")) or shutil.which("go") is not None
    if not can_build:
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
    t0 = time.monotonic()
    try:
        _STATE["binaries"] = find_binaries(version=_STATE["k8s_version"])
    except BinariesUnavailable as e:
        _STATE["error"] = str(e)
        _STATE["attempted"] = True
    _STATE["binaries_seconds"] = time.monotonic() - t0
    if tr is not None:
        where = _STATE.get("binaries") or "FAILED"
        tr.write_line(f"[controlplane] binaries: {where} ({_STATE['binaries_seconds']:.1f}s)")


def _binaries_or_fail() -> Path:
    if "binaries" in _STATE:
        return _STATE["binaries"]
    if "error" not in _STATE:  # plugin used without collection hook (e.g. fixture in odd item)
        try:
            _STATE["k8s_version"], _STATE["gates"] = _release_and_gates()
            _STATE["binaries"] = find_binaries(version=_STATE["k8s_version"])
            return _STATE["binaries"]
        except (BinariesUnavailable, ValueError) as e:
            _STATE["error"], _STATE["attempted"] = str(e), True
    msg = _STATE["error"]
    if _in_ci() or _STATE.get("attempted"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def control_plane():
    binaries = _binaries_or_fail()
    if "start_error" in _STATE:  # don't retry a failed start for every test
        pytest.fail(_STATE["start_error"], pytrace=False)
    cp = ControlPlane(binaries=binaries, k8s_version=_STATE["k8s_version"], gates=_STATE["gates"])
    try:
        cp.start()
    except Exception as e:  # noqa: BLE001
        _STATE["start_error"] = f"control plane failed to start: {e}"
        pytest.fail(_STATE["start_error"], pytrace=False)
    _STATE["start_seconds"] = cp.startup_seconds
    try:
        yield cp
    finally:
        t0 = time.monotonic()
        cp.stop()
        _STATE["stop_seconds"] = time.monotonic() - t0


@pytest.fixture(scope="session")
def kube_api(control_plane):
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(control_plane, kube_api):
    name = helpers.create_namespace(kube_api, helpers.unique_name("dra-test"))
    if control_plane.want_controller_manager:
        helpers.wait_for_default_service_account(kube_api, name)
    try:
        yield name
    finally:
        helpers.delete_namespace(kube_api, name)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
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

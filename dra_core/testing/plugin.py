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
``dra_ready_node`` (function)
    The name of a new Node the scheduler places pods on (no kubelet behind it:
    :func:`~dra_core.testing.scenario.create_ready_node`), deleted afterwards.
``dra_agent`` (function)
    A factory: ``dra_agent(backend, *, options=None, node=None, process=False, ...)`` starts the
    node agent running ``backend`` (an installed backend's entry-point name, or backend
    objects) against the control plane, its directories below a short temporary directory,
    and returns a :class:`~dra_core.testing.agent.RunningAgent` once it serves (``.agent``,
    ``.settings``, ``.registration_socket``, ``.node``, ``.driver``); without ``node`` it gets a
    ready Node of its own. Agents, their Nodes and directories go after the test.
``dra_kubelet`` (function)
    A factory: ``dra_kubelet(agent)`` returns a :class:`~dra_core.testing.kubelet.FakeKubelet`
    registered with that agent, closed after the test.
``dra_real_node`` (session)
    A started :class:`~dra_core.testing.node.Node` (containerd, runc, kubelet) registered with
    the control plane, for tests marked ``realnode``; stopped at the end (which fails if the
    host is left changed). It needs root; without root, or without its binaries
    (``DRA_TEST_NODE_BINARIES``, a cached build, or a build now with Go), its tests are skipped
    with the reason, and fail in CI. ``dra_real_node_binaries`` (session) is their directory.

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

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:  # the plugin loads in every pytest session: import the heavy parts lazily
    from dra_core.kube.client import KubeClient
    from dra_core.testing.agent import RunningAgent
    from dra_core.testing.controlplane import ControlPlane
    from dra_core.testing.kubelet import FakeKubelet
    from dra_core.testing.node import Node as RealNode

MARKER = "controlplane"
REALNODE_MARKER = "realnode"
_STATE: dict[str, Any] = {}
#: What the real node's fixtures found (binaries, or why there are none) and how they went.
_NODE_STATE: dict[str, Any] = {}


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
        f"{REALNODE_MARKER}: runs pods on a real node (kubelet, containerd, runc); needs root",
    )
    config.addinivalue_line(
        "markers",
        "requires_feature(*gates): needs these feature gates on in the test control plane; "
        "skipped, naming them, where its API server has one off (DRA_K8S_VERSION, "
        "DRA_TEST_GATES)",
    )
    config.addinivalue_line(
        "markers",
        "all_mode_over_counters: has a claim with allocationMode All that can select devices "
        "consuming counters; skipped where the scheduler crashes on it (Kubernetes 1.35 with "
        "DRAPartitionableDevices on, RELEASE.md)",
    )


def _release_and_gates() -> tuple[str, str]:
    """The release and gate set chosen by the environment, checked once for the session."""
    from dra_core.testing.controlplane import k8s_minor, selected_gate_set, selected_k8s_version

    version, gates = selected_k8s_version(), selected_gate_set()
    k8s_minor(version)  # raises ValueError for a release the harness does not know
    return version, gates


def _wanted(session: pytest.Session, marker: str = MARKER) -> bool:
    return any(item.get_closest_marker(marker) for item in session.items)


def skip_or_fail(msg: str) -> NoReturn:
    """Skip the test with ``msg``, or fail it where ``CI`` is true (CI must not skip)."""
    if _in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def pytest_report_header(config: pytest.Config) -> str | None:
    try:
        version, gates = _release_and_gates()
    except ValueError as e:
        return f"controlplane: {e}"
    return f"controlplane: Kubernetes {version}, feature gates: {gates} (DRA_TEST_GATES)"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provide the binaries once, before any test (and its timeout) starts."""
    if session.config.option.collectonly:
        return
    if _wanted(session, REALNODE_MARKER):
        _provide_node_binaries(session)
    if not _wanted(session):
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


def _provide_node_binaries(session: pytest.Session) -> None:
    """The real node's binaries, provided once before any test when a test is marked
    ``realnode``; why they are not there is kept for the tests to report."""
    from dra_core.testing.controlplane import BinariesUnavailable, selected_k8s_version
    from dra_core.testing.node import find_node_binaries

    if os.geteuid() != 0:
        _NODE_STATE["error"] = "a real node needs root (the kubelet and containerd run as root)"
        return
    if not os.environ.get("DRA_TEST_NODE_BINARIES") and shutil.which("go") is None:
        _NODE_STATE["error"] = (
            "node binaries unavailable: DRA_TEST_NODE_BINARIES is not set and no Go toolchain "
            "is on PATH to build them (dra_core/testing/node-build.sh)"
        )
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    say = tr.write_line if tr is not None else print
    say("[realnode] providing binaries via dra_core/testing/node-build.sh ...")
    started = time.monotonic()
    try:
        _NODE_STATE["binaries"] = find_node_binaries(progress=say, version=selected_k8s_version())
    except (BinariesUnavailable, ValueError) as e:
        _NODE_STATE["error"] = str(e)
    where = _NODE_STATE.get("binaries", "FAILED")
    say(f"[realnode] binaries: {where} ({time.monotonic() - started:.1f}s)")


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


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def dra_ready_node(dra_kube_client: KubeClient) -> Iterator[str]:
    """The name of a new Node the scheduler places pods on, deleted after the test.

    No kubelet runs behind it: :func:`~dra_core.testing.scenario.create_ready_node` reports it
    Ready and lifts the ``not-ready`` taint every new Node gets, as a kubelet would."""
    from dra_core.testing.scenario import ready_node

    with ready_node(dra_kube_client, _unique("dra-node")) as name:
        yield name


@pytest.fixture
def dra_agent(
    dra_control_plane: ControlPlane, dra_kube_client: KubeClient
) -> Iterator[Callable[..., RunningAgent]]:
    """A factory that starts node agents against the control plane; they stop after the test.

    ``dra_agent(backend, *, options=None, node=None, name=None, process=False, extra_args=(),
    **settings)``: ``backend`` is an installed backend's entry-point name or backend objects
    (a class, factory or object with hook implementations, named ``name``); ``options`` its
    option values (``_`` for ``-``); ``node`` an existing Node (default: a new ready one);
    ``settings`` other :class:`~dra_core.runtime.AgentSettings` fields. ``process=True`` runs
    ``python -m dra_core run`` instead of an agent in the test's process (see
    :func:`dra_core.testing.agent.start_agent`). Returns the agent serving its sockets; its
    ResourceSlices may still be on their way (``scenario.published_slices``)."""
    from dra_core.testing.agent import start_agent
    from dra_core.testing.scenario import ready_node

    with contextlib.ExitStack() as stack:

        def start(backend: str | object, *, node: str | None = None, **kwargs: Any) -> RunningAgent:
            if node is None:
                node = stack.enter_context(ready_node(dra_kube_client, _unique("dra-agent")))
            # Unix socket paths are short; pytest's tmp_path can be too long for them.
            root = Path(tempfile.mkdtemp(prefix="dra-agent-", dir="/tmp"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
            running = start_agent(
                backend,
                root=root,
                node=node,
                kubeconfig=str(dra_control_plane.kubeconfig_path),
                start=False,
                **kwargs,
            )
            stack.callback(running.stop)  # also when it fails to start: what did start stops
            running.start()
            return running

        yield start


@pytest.fixture
def dra_kubelet() -> Iterator[Callable[[RunningAgent], FakeKubelet]]:
    """A factory: ``dra_kubelet(agent)`` is a :class:`~dra_core.testing.kubelet.FakeKubelet`
    registered with ``agent`` (from ``dra_agent``) as the kubelet registers, closed after the
    test."""
    with contextlib.ExitStack() as stack:

        def connect(agent: RunningAgent) -> FakeKubelet:
            return stack.enter_context(agent.kubelet())

        yield connect


@pytest.fixture(scope="session")
def dra_real_node_binaries() -> Path:
    """The directory of the real node's binaries (containerd, runc, kubelet...)."""
    if "binaries" not in _NODE_STATE:
        skip_or_fail(_NODE_STATE.get("error", "the real node's binaries were not provided"))
    binaries: Path = _NODE_STATE["binaries"]
    return binaries


@pytest.fixture(scope="session")
def dra_real_node(
    dra_real_node_binaries: Path, dra_control_plane: ControlPlane
) -> Iterator[RealNode]:  # the binaries first: a test skipped for them starts no control plane
    """A real node (containerd, runc, kubelet) of the control plane, shared by the session
    (see the module's documentation)."""
    from dra_core.testing.node import Node

    if "start_error" in _NODE_STATE:  # don't retry a failed start for every test
        pytest.fail(_NODE_STATE["start_error"], pytrace=False)
    node = Node(dra_control_plane, dra_real_node_binaries, name="dra-real-node")
    started = time.monotonic()
    try:
        node.start()
    except Exception as e:  # noqa: BLE001 - reported once, for every test that needs it
        _NODE_STATE["start_error"] = f"the real node failed to start: {e}"
        pytest.fail(_NODE_STATE["start_error"], pytrace=False)
    _NODE_STATE["start_seconds"] = time.monotonic() - started
    try:
        yield node
    finally:
        node.stop()


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


@pytest.fixture(autouse=True)
def _dra_all_mode_over_counters(request: pytest.FixtureRequest) -> None:
    """Skip a test marked ``all_mode_over_counters`` where its claim would crash the scheduler
    (and with it every later test of the session)."""
    if request.node.get_closest_marker("all_mode_over_counters") is None:
        return
    from dra_core.releases import all_mode_over_counters_crashes_scheduler

    plane: ControlPlane = request.getfixturevalue("dra_control_plane")
    if all_mode_over_counters_crashes_scheduler(plane.k8s_version) and not plane.missing_gates(
        "DRAPartitionableDevices"
    ):
        pytest.skip(
            f"the kube-scheduler of Kubernetes {plane.k8s_version} crashes on a claim with "
            "allocationMode All over devices that consume counters when "
            "DRAPartitionableDevices is on (fixed in 1.36; RELEASE.md)"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "start_seconds" in _NODE_STATE:
        seconds = _NODE_STATE["start_seconds"]
        terminalreporter.write_line(f"[realnode] node started in {seconds:.1f}s")
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

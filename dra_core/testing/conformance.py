"""A conformance suite for dra-core backends: does the backend behave as the core expects?

Run it from a test module of the backend with one class::

    from dra_core.testing.conformance import BackendConformance

    class TestConformance(BackendConformance):
        backend = "widget"                     # the entry-point name
        valid_config = {"apiVersion": "widget.example.com/v1", "kind": "WidgetConfig"}

The backend must be installed (``pip install -e .``): the suite runs it the way an operator
does, as ``python -m dra_core run --backend widget`` on a Node of the real control plane of
:mod:`dra_core.testing.plugin`, and talks to it through its kubelet sockets with
:class:`~dra_core.testing.kubelet.FakeKubelet`. Every test is marked ``controlplane``. What it
checks, one test each:

* ``dra-core discover``, told the API server's release and feature gates, prints slices the
  real API server accepts (fields, limits, CEL-visible attributes, counter layout), with at
  least one device;
* the agent publishes them: the devices in its complete ResourceSlices are the ones
  ``discover`` printed for that server;
* every DeviceClass of ``dra-core render`` is accepted (a class the server refuses because a
  feature gate is off is not tried), and for each the real scheduler allocates a device to a
  pod's claim (unless the agent left that class's devices out for a feature the API server
  lacks; at least one class must allocate), the agent prepares it (CDI devices that exist in
  the CDI specs it wrote), a second prepare answers the same, unprepare succeeds twice and
  removes the claim's CDI spec;
* opaque configuration is strict: a valid config prepares, the same with an unknown field
  fails the claim with a message naming the field;
* a crash right after the backend's ``dra_prepare`` returned (the process dies before the
  checkpoint records the claim as prepared) loses nothing: after a restart the claim prepares
  and unprepares cleanly;
* health (when the test can make a device unhealthy: override ``set_health``): an unhealthy
  device is tainted ``<driver>/unhealthy`` in its slice (or left out, where the API server
  drops taints), and the taint goes when it recovers;
* the backend's example manifests (``examples``) are accepted by the API server.

Override the ``backend_args`` fixture for options the backend needs (e.g. a sysfs tree made
for the test), and set ``classes_without_devices`` for classes whose devices the test node
does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
import pytest
import yaml

from dra_core.releases import GATES_ANNOTATION, gate_defaults
from dra_core.testing.agent import RunningAgent, start_agent
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import (
    RESOURCE_API,
    claim_body,
    claim_ref,
    delete_pod_now,
    delete_quietly,
    pod_body,
    published_slices,
    ready_node,
    wait_for,
    wait_for_allocation,
)

if TYPE_CHECKING:
    from dra_core.kube.client import KubeClient
    from dra_core.model import ClaimRef, ClaimResult
    from dra_core.testing.controlplane import ControlPlane

__all__ = ("AgentUnderTest", "BackendConformance", "check_example")

#: ``python -c`` program: ``dra-core`` whose process dies right after the backend's prepare
#: returns, before the core records the claim as prepared (the worst moment for a crash).
_CRASH_AFTER_PREPARE = """
import os, sys
import dra_core.plugins as plugins
from dra_core import hookimpl

class CrashAfterPrepare:
    @hookimpl(wrapper=True)
    def dra_prepare(self):
        yield
        print("conformance: crashing right after the backend's dra_prepare", file=sys.stderr)
        os._exit(137)

_load = plugins.load
plugins.load = lambda name, **kw: _load(name, extra=[("crash", CrashAfterPrepare())], **kw)
from dra_core.cli import main
sys.exit(main(sys.argv[1:]))
"""
KUBERNETES_APIS = {"v1", "apps/v1", "resource.k8s.io/v1"}
NAMESPACED_PATHS = {
    "ResourceClaimTemplate": f"{RESOURCE_API}/namespaces/{{ns}}/resourceclaimtemplates",
    "ResourceClaim": f"{RESOURCE_API}/namespaces/{{ns}}/resourceclaims",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
}
CLUSTER_PATHS = {"DeviceClass": f"{RESOURCE_API}/deviceclasses"}


def _dra_core(*args: str) -> str:
    """Run ``python -m dra_core ARGS`` and return its standard output (failures name it)."""
    done = subprocess.run(
        [sys.executable, "-m", "dra_core", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        msg = f"`dra-core {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}"
        raise AssertionError(msg)
    return done.stdout


@dataclass
class AgentUnderTest(RunningAgent):
    """The backend's node agent, a process of its own (:func:`~dra_core.testing.agent.start_agent`
    with ``process=True``), and what the suite knows about it."""

    #: ``dra-core discover``'s slices: every device the backend found.
    discovered: list[dict[str, Any]] = field(default_factory=list)
    #: The same for the test's API server (its release and gates): what the agent publishes.
    for_server: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    refused_classes: dict[str, str] = field(default_factory=dict)

    def published(self, client: KubeClient) -> list[dict[str, Any]]:
        """The agent's ResourceSlices once it has written all of them."""
        return wait_for(
            "the agent's complete ResourceSlices",
            lambda: published_slices(client, self.node, self.driver),
            30,
        )

    def cdi_ids(self) -> set[str]:
        """Every fully qualified CDI device name in the agent's CDI specs."""
        ids = set()
        for spec_file in self.cdi_dir.glob("*.json"):
            spec = json.loads(spec_file.read_text())
            ids |= {f"{spec['kind']}={d['name']}" for d in spec.get("devices", ())}
        return ids


class BackendConformance:
    """Subclass with ``backend`` set to run the conformance suite on that backend."""

    #: The backend's entry-point name (``dra-core run --backend NAME``).
    backend: ClassVar[str] = ""
    #: An opaque configuration the driver accepts (``parameters`` of a claim's config); None
    #: skips the strictness test.
    valid_config: ClassVar[Mapping[str, Any] | None] = None
    #: DeviceClasses whose devices the test node has none of (not tried for allocation).
    classes_without_devices: ClassVar[Collection[str]] = ()
    #: Example manifests of the backend; their Kubernetes objects must be accepted.
    examples: ClassVar[Sequence[Path]] = ()

    # ------------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def backend_args(cls) -> Sequence[str]:
        """The backend's options as ``dra-core run`` flags; override to give some."""
        return ()

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_agent(
        cls,
        dra_control_plane: ControlPlane,
        dra_kube_client: KubeClient,
        backend_args: Sequence[str],
    ) -> Iterator[AgentUnderTest]:
        if not cls.backend:
            pytest.fail(f"{cls.__name__}: set `backend` to the backend's entry-point name")
        node = f"conformance-{uuid.uuid4().hex[:6]}"
        printed = _dra_core(
            "discover", "--backend", cls.backend, "--node-name", node, *backend_args
        )
        discovered = [s for s in yaml.safe_load_all(printed) if s]
        printed = _dra_core(
            "discover", "--backend", cls.backend, "--node-name", node, *backend_args,
            *_release_flags(dra_control_plane),
        )  # fmt: skip
        root = Path(tempfile.mkdtemp(prefix="dra-conf-", dir="/tmp"))  # short socket paths
        running = start_agent(
            cls.backend,
            root=root,
            node=node,
            kubeconfig=str(dra_control_plane.kubeconfig_path),
            process=True,  # as operators run it, and a crash must not take the tests along
            extra_args=backend_args,
            driver=discovered[0]["spec"]["driver"] if discovered else None,
            start=False,
        )
        agent = AgentUnderTest(
            **vars(running),
            discovered=discovered,
            for_server=[s for s in yaml.safe_load_all(printed) if s],
        )
        with ready_node(dra_kube_client, node):
            created = cls._create_classes(dra_kube_client, agent)
            try:
                agent.start()
                yield agent
            finally:
                agent.stop()
                for name in created:
                    delete_quietly(dra_kube_client, f"{RESOURCE_API}/deviceclasses/{name}")
                if os.environ.get("DRA_CONFORMANCE_KEEP") != "1":
                    shutil.rmtree(root, ignore_errors=True)

    @classmethod
    def _create_classes(cls, client: KubeClient, agent: AgentUnderTest) -> list[str]:
        """Create the rendered DeviceClasses; note the ones the server refuses for a gate."""
        from dra_core.kube.client import ApiError

        created = []
        for body in yaml.safe_load_all(_dra_core("render", "--backend", cls.backend)):
            if not body or body.get("kind") != "DeviceClass":
                continue
            name = body["metadata"]["name"]
            gates = body["metadata"].get("annotations", {}).get(GATES_ANNOTATION)
            try:
                client.request("POST", f"{RESOURCE_API}/deviceclasses", body=body)
            except ApiError as exc:
                if exc.status == 422 and gates:
                    agent.refused_classes[name] = f"needs the feature gate(s) {gates}: {exc}"
                    continue
                raise
            created.append(name)
            if name not in cls.classes_without_devices:
                agent.classes.append(name)
        return created

    # ------------------------------------------------------------------------ the suite
    @pytest.mark.controlplane
    def test_discovered_slices_are_accepted(
        self, conformance_agent: AgentUnderTest, dra_kube_client: KubeClient
    ) -> None:
        agent = conformance_agent
        assert agent.discovered, f"`dra-core discover --backend {self.backend}` printed no slice"
        devices = sum(len(s["spec"].get("devices") or ()) for s in agent.for_server)
        assert devices > 0, f"backend {self.backend!r} discovered no device on the test node"
        for body in agent.for_server:
            dry = {**body, "metadata": {**body["metadata"], "ownerReferences": []}}
            dra_kube_client.request(
                "POST", f"{RESOURCE_API}/resourceslices", body=dry, query={"dryRun": "All"}
            )

    @pytest.mark.controlplane
    def test_agent_publishes_discovered_devices(
        self, conformance_agent: AgentUnderTest, dra_kube_client: KubeClient
    ) -> None:
        agent = conformance_agent
        slices = agent.published(dra_kube_client)
        published = _device_names(slices)
        expected = _device_names(agent.for_server)
        assert published, f"the agent published no device:\n{agent.log_tail()}"
        assert published == expected, (
            f"published but not printed by `dra-core discover` for this API server: "
            f"{published - expected}; printed but not published: {expected - published}"
        )

    @pytest.mark.controlplane
    def test_each_class_allocates_prepares_and_unprepares(
        self,
        conformance_agent: AgentUnderTest,
        dra_kube_client: KubeClient,
        dra_namespace: str,
    ) -> None:
        agent = conformance_agent
        if not agent.classes:
            pytest.skip(f"no DeviceClass to try; refused by the server: {agent.refused_classes}")
        left_out = _left_out(dra_kube_client, agent)
        tried = []
        with agent.kubelet() as kubelet:
            for device_class in agent.classes:
                try:
                    ref = _allocate(dra_kube_client, dra_namespace, agent, device_class)
                except TimeoutError:
                    if not left_out:
                        raise
                    continue  # its devices may be the ones this API server cannot take
                tried.append(device_class)
                first = _prepared(kubelet, ref, f"class {device_class}")
                ids = {i for d in first.devices for i in d.cdi_device_ids}
                missing = ids - agent.cdi_ids()
                assert not missing, f"class {device_class}: CDI devices not in any spec: {missing}"
                again = _prepared(kubelet, ref, f"class {device_class}, second prepare")
                assert again == first, (
                    f"class {device_class}: a second prepare answered differently"
                )
                for attempt in ("first", "second"):
                    error = kubelet.unprepare([ref])[ref.uid]
                    assert not error, f"class {device_class}: {attempt} unprepare failed: {error}"
                left = [p.name for p in agent.cdi_dir.glob("*.json") if ref.uid in p.read_text()]
                assert not left, f"class {device_class}: CDI specs left after unprepare: {left}"
                _release(dra_kube_client, dra_namespace, ref)
        assert tried, f"no class could be allocated; devices left out by the agent: {left_out}"

    @pytest.mark.controlplane
    def test_opaque_config_is_strict(
        self,
        conformance_agent: AgentUnderTest,
        dra_kube_client: KubeClient,
        dra_namespace: str,
    ) -> None:
        if self.valid_config is None:
            pytest.skip("no `valid_config` given for this backend")
        agent = conformance_agent
        if not agent.classes:
            pytest.skip("no DeviceClass to request a device with")
        unknown = "conformanceUnknownField"
        with agent.kubelet() as kubelet:
            ref = _allocate(
                dra_kube_client, dra_namespace, agent, agent.classes[0], self.valid_config
            )
            _prepared(kubelet, ref, "a claim with the valid config")
            assert not kubelet.unprepare([ref])[ref.uid]
            _release(dra_kube_client, dra_namespace, ref)
            bad = {**self.valid_config, unknown: True}
            ref = _allocate(dra_kube_client, dra_namespace, agent, agent.classes[0], bad)
            result = kubelet.prepare([ref])[ref.uid]
            assert result.error, f"a config with the unknown field {unknown!r} was accepted"
            assert unknown in result.error, f"the error does not name the field: {result.error}"
            assert not kubelet.unprepare([ref])[ref.uid]
            _release(dra_kube_client, dra_namespace, ref)

    @pytest.mark.controlplane
    def test_crash_after_backend_prepare_loses_nothing(
        self,
        conformance_agent: AgentUnderTest,
        dra_kube_client: KubeClient,
        dra_namespace: str,
    ) -> None:
        agent = conformance_agent
        if not agent.classes:
            pytest.skip("no DeviceClass to request a device with")
        ref = _allocate(dra_kube_client, dra_namespace, agent, agent.classes[0])
        agent.stop()
        agent.start(program=("-c", _CRASH_AFTER_PREPARE))
        with contextlib.suppress(grpc.RpcError), agent.kubelet() as kubelet:
            kubelet.prepare([ref])  # the call dies with the agent: that is the test
        assert agent.proc is not None
        assert agent.proc.wait(30) == 137, f"the agent did not crash:\n{agent.log_tail()}"
        agent.start()
        with agent.kubelet() as kubelet:
            result = _prepared(kubelet, ref, "the claim prepared again after the crash")
            ids = {i for d in result.devices for i in d.cdi_device_ids}
            assert ids <= agent.cdi_ids(), "CDI devices missing after the restart"
            error = kubelet.unprepare([ref])[ref.uid]
            assert not error, f"unprepare after the crash failed: {error}"
        left = [p.name for p in agent.cdi_dir.glob("*.json") if ref.uid in p.read_text()]
        assert not left, f"CDI specs left after unprepare: {left}"
        _release(dra_kube_client, dra_namespace, ref)

    def set_health(self, agent: AgentUnderTest, device: str, healthy: bool) -> bool:
        """Make ``device`` (a name in the backend's pool) unhealthy or healthy again, as the
        hardware would; return False when the backend's test setup cannot (the health test
        is then skipped). Override for a backend with health checks."""
        return False

    @pytest.mark.controlplane
    def test_health_becomes_a_taint_and_recovery_lifts_it(
        self, conformance_agent: AgentUnderTest, dra_kube_client: KubeClient
    ) -> None:
        agent = conformance_agent
        slices = agent.published(dra_kube_client)
        device = next(d["name"] for s in slices for d in s["spec"].get("devices") or ())
        if not self.set_health(agent, device, healthy=False):
            pytest.skip("`set_health` is not implemented for this backend's test setup")
        taint = f"{agent.driver}/unhealthy"

        def published() -> dict[str, Any] | None:
            now = published_slices(dra_kube_client, agent.node, agent.driver) or ()
            found = [d for s in now for d in s["spec"].get("devices") or () if d["name"] == device]
            return found[0] if found else None

        def has_taint(found: dict[str, Any]) -> bool:
            return any(t["key"] == taint for t in found.get("taints") or ())

        def tainted() -> bool:
            # With device taints off in the API server the agent leaves the device out instead.
            found = published()
            return found is None or has_taint(found)

        try:
            wait_for(f"device {device} to be tainted {taint} (or left out)", tainted, 30)
        finally:
            self.set_health(agent, device, healthy=True)

        def recovered() -> bool:
            found = published()
            return found is not None and not any(
                t["key"] == taint for t in found.get("taints") or ()
            )

        wait_for(f"device {device} to be published without the taint again", recovered, 30)

    @pytest.mark.controlplane
    def test_examples_are_accepted(self, dra_kube_client: KubeClient, dra_namespace: str) -> None:
        if not self.examples:
            pytest.skip("no `examples` given for this backend")
        for path in self.examples:
            check_example(dra_kube_client, Path(path), dra_namespace)


# ---------------------------------------------------------------------------- steps
def check_example(client: KubeClient, path: Path, namespace: str) -> None:
    """Create the Kubernetes objects of ``path`` with a server-side dry run, in ``namespace``
    or in the file's own Namespace (created for real under a unique name with its labels, as
    admission reads them, e.g. for admin access), which is deleted afterwards."""
    from dra_core.kube.client import ApiError

    bodies = [
        b
        for b in yaml.safe_load_all(path.read_text())
        if isinstance(b, dict) and b.get("apiVersion") in KUBERNETES_APIS
    ]  # a backend's own files (inventories, control files) are not Kubernetes objects
    own = [b for b in bodies if b["kind"] == "Namespace"]
    if own:
        labels = own[0]["metadata"].get("labels", {})
        namespace = f"conf-{uuid.uuid4().hex[:8]}"
        client.request(
            "POST",
            "/api/v1/namespaces",
            body={
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "labels": labels},
            },
        )
    try:
        for body in bodies:
            kind = body["kind"]
            if kind == "Namespace":
                continue
            if kind in CLUSTER_PATHS:
                where = CLUSTER_PATHS[kind]
            elif kind in NAMESPACED_PATHS:
                where = NAMESPACED_PATHS[kind].format(ns=namespace)
                body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
            else:
                pytest.fail(f"{path}: the suite does not know where to create a {kind}")
            try:
                created = client.request("POST", where, body=body, query={"dryRun": "All"})
            except ApiError as exc:
                msg = f"{path}: {kind} {body['metadata'].get('name')} refused: {exc}"
                raise AssertionError(msg) from None
            assert created["metadata"]["name"] == body["metadata"]["name"], created
    finally:
        if own:
            delete_quietly(client, f"/api/v1/namespaces/{namespace}")


def _device_names(slices: Sequence[Mapping[str, Any]]) -> set[str]:
    return {
        f"{s['spec']['pool']['name']}/{d['name']}"
        for s in slices
        for d in s["spec"].get("devices") or ()
    }


def _release_flags(plane: ControlPlane) -> list[str]:
    """``dra-core discover``'s flags for the API server of ``plane``: its release and how it
    runs each DRA gate, as the server itself reports them."""
    enabled = plane.enabled_gates()
    gates = (f"{g}={str(enabled.get(g, False)).lower()}" for g in gate_defaults(plane.k8s_version))
    return ["--kubernetes-version", plane.k8s_version, "--feature-gates", ",".join(gates)]


def _left_out(client: KubeClient, agent: AgentUnderTest) -> set[str]:
    """Discovered devices the agent does not publish: where the API server lacks a feature
    (e.g. partitionable devices), the agent leaves out what the scheduler could misuse, and a
    class of only such devices has nothing to allocate."""
    return _device_names(agent.discovered) - _device_names(agent.published(client))


def _allocate(
    client: KubeClient,
    namespace: str,
    agent: AgentUnderTest,
    device_class: str,
    config: Mapping[str, Any] | None = None,
) -> ClaimRef:
    """A claim for one device of ``device_class`` (with ``config``), allocated by the real
    scheduler for a pod placed on the agent's node."""
    name = f"conf-{uuid.uuid4().hex[:8]}"
    body = claim_body(name, device_class)
    if config is not None:
        body["spec"]["devices"]["config"] = [
            {"opaque": {"driver": agent.driver, "parameters": dict(config)}}
        ]
    claim = client.request(
        "POST", f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims", body=body
    )
    pod = pod_body(
        f"pod-{name}", [{"name": "device", "resourceClaimName": name}], on_node=agent.node
    )
    client.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
    wait_for_allocation(client, namespace, [name], timeout=60)
    return claim_ref(claim)


def _prepared(kubelet: FakeKubelet, ref: ClaimRef, what: str) -> ClaimResult:
    result = kubelet.prepare([ref])[ref.uid]
    assert not result.error, f"{what}: prepare failed: {result.error}"
    assert result.devices, f"{what}: prepare returned no device"
    return result


def _release(client: KubeClient, namespace: str, ref: ClaimRef) -> None:
    """Delete the claim's pod and the claim, so the scheduler frees its device."""
    delete_pod_now(client, namespace, f"pod-{ref.name}")
    delete_quietly(client, f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims/{ref.name}")

    def gone() -> bool:
        from dra_core.kube.client import ApiError

        try:
            client.request(
                "GET", f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims/{ref.name}"
            )
        except ApiError as exc:
            return exc.not_found
        return False

    wait_for(f"ResourceClaim {namespace}/{ref.name} to be deleted", gone, 30)

"""Killed at any step of prepare or unprepare and restarted: no corrupt checkpoint, no leaked
CDI spec or side effect, and the claim ends prepared exactly once or cleanly unprepared."""

from __future__ import annotations

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

from dra_core import ClaimRef
from dra_core.checkpoint import Checkpoint
from dra_core.testing.kubelet import FakeKubelet
from dra_core.testing.scenario import create_ready_node
from tests.controlplane import helpers

pytestmark = pytest.mark.controlplane

SCRIPT = Path(__file__).with_name("crash_agent.py")
DRIVER = "crash.dra-core.dev"
NODE = "crash-node"


class AgentProcess:
    def __init__(self, root: Path, kubeconfig: str) -> None:
        self.root = root
        self.kubeconfig = kubeconfig
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crash_at: str | None = None, boot_id: str = "boot-1") -> None:
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "BOOT_ID": boot_id}
        env.pop("CRASH_AT", None)
        if crash_at:
            env["CRASH_AT"] = crash_at
        with (self.root / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(self.root), self.kubeconfig],
                env=env,
                stdout=log,
                stderr=log,
            )
        helpers.wait_for(self._answers, 30, "the agent to answer on its registration socket")

    def _answers(self) -> bool:
        """True once the registration socket answers (a crashed agent leaves a stale one)."""
        assert self.proc is not None
        assert self.proc.poll() is None, (self.root / "agent.log").read_text()[-3000:]
        with FakeKubelet(self.root / "registry" / f"{DRIVER}-reg.sock") as peer:
            peer.get_info()
        return True

    def kubelet(self) -> FakeKubelet:
        peer = FakeKubelet(self.root / "registry" / f"{DRIVER}-reg.sock")
        peer.register()
        return peer

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def state(self) -> tuple[dict, list[str], list[str]]:
        """Checkpoint records, CDI spec files and side-effect files on disk."""
        checkpoint = Checkpoint.open(self.root / "plugins" / DRIVER / "checkpoint.json")
        specs = sorted(p.name for p in (self.root / "cdi").glob("*.json"))
        effects = sorted(p.name for p in (self.root / "effects").iterdir())
        return checkpoint.records(), specs, effects


@pytest.fixture(scope="module")
def node(kube_api, dra_kube_client) -> Iterator[str]:
    create_ready_node(dra_kube_client, NODE)
    helpers.create_device_class(kube_api, DRIVER, driver=DRIVER)
    yield NODE
    helpers.delete_node(kube_api, NODE)


@pytest.fixture
def agent(control_plane, node) -> Iterator[AgentProcess]:
    root = Path(tempfile.mkdtemp(prefix="dra-crash-", dir="/tmp"))
    process = AgentProcess(root, str(control_plane.kubeconfig_path))
    yield process
    process.stop()
    shutil.rmtree(root, ignore_errors=True)


def allocated_claim(api, namespace: str, name: str) -> ClaimRef:
    claim = helpers.create_resource_claim(api, namespace, helpers.resource_claim_body(name, DRIVER))
    pod = helpers.pod_body(f"pod-{name}", [{"name": "dev", "resourceClaimName": name}])
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
    helpers.create_pod(api, namespace, pod)
    helpers.wait_for_claim_allocated(api, namespace, name)
    return ClaimRef(namespace, name, claim["metadata"]["uid"])


def wait_reconciled(agent: AgentProcess) -> None:
    """Start-up reconciliation runs in the background; wait until nothing is 'started'."""
    helpers.wait_for(
        lambda: all(r.phase == "completed" for r in agent.state()[0].values()),
        20,
        "start-up reconciliation",
    )


@pytest.mark.parametrize("crash_at", ["backend-prepare", "after-cdi-write", "before-complete"])
def test_crash_during_prepare_is_rolled_back(agent, kube_api, namespace, crash_at):
    agent.start(crash_at)
    ref = allocated_claim(kube_api, namespace, "c")
    with agent.kubelet() as kubelet, pytest.raises(Exception):  # noqa: B017 - the agent died
        kubelet.prepare([ref])
    assert agent.wait_exit() == 137
    records, _, _ = agent.state()
    assert records[ref.uid].phase == "started", "the crash left the claim half prepared"

    agent.start()
    wait_reconciled(agent)
    assert agent.state() == ({}, [], []), "rolled back: no record, no CDI spec, no side effect"
    with agent.kubelet() as kubelet:
        result = kubelet.prepare([ref])[ref.uid]
        assert result.error == ""
        records, specs, effects = agent.state()
        assert records[ref.uid].phase == "completed"
        assert specs == [f"dra-core.dev-crash_{ref.uid}.json"]
        assert effects == [result.devices[0].device_name]
        assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert agent.state() == ({}, [], [])


def test_crash_before_the_completed_record_is_flushed_keeps_the_claim_prepared(
    agent, kube_api, namespace
):
    """Killed with the completed record appended but not flushed (the kubelet got no answer):
    the file keeps it (a killed process loses no page cache), and the retry is answered from
    the checkpoint, flushed first, without preparing again."""
    agent.start("before-completed-flush")
    ref = allocated_claim(kube_api, namespace, "f")
    with agent.kubelet() as kubelet, pytest.raises(Exception):  # noqa: B017 - the agent died
        kubelet.prepare([ref])
    assert agent.wait_exit() == 137
    records, specs, effects = agent.state()
    assert records[ref.uid].phase == "completed" and specs and len(effects) == 1

    agent.start()
    with agent.kubelet() as kubelet:
        result = kubelet.prepare([ref])[ref.uid]
        assert result.error == ""
        assert agent.state() == (records, specs, effects), "answered from the checkpoint"
        assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert agent.state() == ({}, [], [])


def test_crash_during_unprepare_completes_on_retry(agent, kube_api, namespace):
    agent.start("during-unprepare")
    ref = allocated_claim(kube_api, namespace, "u")
    with agent.kubelet() as kubelet:
        assert kubelet.prepare([ref])[ref.uid].error == ""
        with pytest.raises(Exception):  # noqa: B017 - the agent died
            kubelet.unprepare([ref])
    assert agent.wait_exit() == 137
    records, specs, effects = agent.state()
    assert ref.uid in records and specs and effects == [], "crashed after the side effect"

    agent.start()
    with agent.kubelet() as kubelet:
        assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert agent.state() == ({}, [], [])


def test_restart_regenerates_missing_spec_and_removes_orphans(agent, kube_api, namespace):
    agent.start()
    ref = allocated_claim(kube_api, namespace, "r")
    with agent.kubelet() as kubelet:
        first = kubelet.prepare([ref])[ref.uid]
    agent.stop()
    spec = agent.root / "cdi" / f"dra-core.dev-crash_{ref.uid}.json"
    spec.unlink()
    orphan = agent.root / "cdi" / "dra-core.dev-crash_0b7f0c7e-4a55-4f0e-9d5e-0123456789ab.json"
    orphan.write_text('{"cdiVersion": "0.3.0", "kind": "dra-core.dev/crash", "devices": []}')
    agent.start()
    helpers.wait_for(
        lambda: spec.exists() and not orphan.exists(),
        20,
        "the missing spec regenerated and the orphan removed",
    )
    with agent.kubelet() as kubelet:
        assert kubelet.prepare([ref])[ref.uid] == first
        assert kubelet.unprepare([ref]) == {ref.uid: ""}
    time.sleep(0.1)
    assert agent.state() == ({}, [], [])


def test_after_a_reboot_prepared_claims_are_prepared_again(agent, kube_api, namespace):
    agent.start(boot_id="boot-1")
    ref = allocated_claim(kube_api, namespace, "b")
    with agent.kubelet() as kubelet:
        first = kubelet.prepare([ref])[ref.uid]
    assert first.error == ""
    agent.stop()
    # A reboot loses device state and the CDI specs (/var/run is a tmpfs); the kubelet keeps
    # its own record and will not ask again, so the agent must prepare the claim by itself.
    for path in [*(agent.root / "effects").iterdir(), *(agent.root / "cdi").iterdir()]:
        path.unlink()
    agent.start(boot_id="boot-2")
    device = first.devices[0].device_name

    def prepared_again() -> bool:
        # The device comes back before the claim's `completed` record: wait for both.
        records, _, effects = agent.state()
        record = records.get(ref.uid)
        return (
            effects == [device]
            and record is not None
            and (record.boot_id, record.phase) == ("boot-2", "completed")
        )

    helpers.wait_for(prepared_again, 20, "the claim prepared again after the reboot")
    records, specs, _ = agent.state()
    assert records[ref.uid].phase == "completed"
    assert specs == [f"dra-core.dev-crash_{ref.uid}.json"]
    with agent.kubelet() as kubelet:
        assert kubelet.prepare([ref])[ref.uid] == first
        assert kubelet.unprepare([ref]) == {ref.uid: ""}
    assert agent.state() == ({}, [], [])

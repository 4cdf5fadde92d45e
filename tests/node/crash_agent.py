"""A node agent that dies (os._exit) at a chosen step, for the crash-recovery tests.

Run as ``python tests/node/crash_agent.py ROOT KUBECONFIG [CRASH_AT]``. The backend's side
effects are files in ROOT/effects (one per prepared device), so a test can see leaks.
CRASH_AT is one of: backend-prepare, after-cdi-write, before-complete,
before-completed-flush, during-unprepare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dra_core import BackendIdentity, ContainerEdits, Device, Inventory, PreparedDevice, hookimpl
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint
from dra_core.kube.client import load_client
from dra_core.logs import configure_logging
from dra_core.plugins import from_objects
from dra_core.runtime import Agent, AgentSettings

DRIVER = "crash.dra-core.dev"
NODE = "crash-node"


def crash(point: str) -> None:
    if os.environ.get("CRASH_AT") == point:
        print(f"crashing at {point}", file=sys.stderr, flush=True)
        os._exit(137)


class FileBackend:
    def __init__(self, effects: Path) -> None:
        self.effects = effects
        effects.mkdir(parents=True, exist_ok=True)

    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity(DRIVER, "dra-core.dev", "crash")

    @hookimpl
    def dra_discover(self):
        return Inventory(devices=tuple(Device(f"dev-{i}") for i in range(4)))

    @hookimpl
    def dra_prepare(self, claim):
        for device in claim.devices:
            (self.effects / device.device).write_text(claim.ref.uid)
        crash("backend-prepare")
        return [PreparedDevice(d, ContainerEdits(env={"DEV": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim):
        for device in claim.devices:
            (self.effects / device.allocation.device).unlink(missing_ok=True)
        crash("during-unprepare")
        return True


def main() -> None:
    root, kubeconfig = Path(sys.argv[1]), sys.argv[2]
    configure_logging("DEBUG")
    write = CdiSpecs.write

    def write_then_crash(self, claim):  # type: ignore[no-untyped-def]
        result = write(self, claim)
        crash("after-cdi-write")
        return result

    CdiSpecs.write = write_then_crash  # type: ignore[method-assign]
    put = Checkpoint.put

    last_phase = []

    def put_then_crash(self, record, **options):  # type: ignore[no-untyped-def]
        if record.phase == "completed":
            crash("before-complete")
        put(self, record, **options)
        last_phase[:] = [record.phase]

    Checkpoint.put = put_then_crash  # type: ignore[method-assign]
    flush = Checkpoint.flush

    def crash_then_flush(self):  # type: ignore[no-untyped-def]
        if last_phase == ["completed"]:
            crash("before-completed-flush")
        flush(self)

    Checkpoint.flush = crash_then_flush  # type: ignore[method-assign]
    (root / "boot_id").write_text(os.environ.get("BOOT_ID", "boot-1"))
    hooks = from_objects("files", FileBackend(root / "effects"))
    settings = AgentSettings.below(root, NODE, boot_id_file=root / "boot_id", poll_interval=0.5)
    Agent(settings, hooks, client=load_client(kubeconfig)).run()


if __name__ == "__main__":
    main()

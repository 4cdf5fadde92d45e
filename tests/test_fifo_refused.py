"""A FIFO where the core expects a CDI spec or the boot ID file is refused at once.

Reading a FIFO that nobody writes blocks forever; each read runs in a thread here so that a
regression fails the test instead of hanging it, and the FIFO is then opened for writing to
let a blocked reader go.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dra_core.cdi import CdiError, CdiSpecs
from dra_core.checkpoint import current_boot_id
from dra_core.model import (
    AllocatedDevice,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    PreparedClaim,
    PreparedDevice,
)

UID = "a1b2c3d4-0000-1111-2222-333344445555"
IDENTITY = BackendIdentity(
    driver_name="gpu.example.com", cdi_vendor="k8s.gpu.example.com", cdi_class="gpu"
)
#: Far longer than a refused read takes, far shorter than the test suite's patience.
BOUND_SECONDS = 5.0


def within_bound(fifo: Path, read: Callable[[], Any]) -> Any:
    """What ``read()`` returned or raised, failing the test if it blocked on ``fifo``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = read()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_SECONDS)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # a reader blocked in open goes on, and sees EOF
        thread.join(BOUND_SECONDS)
        pytest.fail(f"reading {fifo} blocked on the FIFO")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def specs(tmp_path: Path) -> CdiSpecs:
    return CdiSpecs(tmp_path / "cdi", IDENTITY)


@pytest.fixture
def spec_fifo(specs: CdiSpecs) -> Path:
    path = specs.spec_path(UID)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    return path


def test_a_fifo_as_a_cdi_spec_is_refused_when_read(specs: CdiSpecs, spec_fifo: Path) -> None:
    with pytest.raises(CdiError, match=r"cannot read it: .* is a FIFO \(named pipe\)"):
        within_bound(spec_fifo, lambda: specs.read(UID))


def test_a_fifo_as_a_cdi_spec_counts_as_ours_and_is_replaced(
    specs: CdiSpecs, spec_fifo: Path
) -> None:
    # Counted as ours, so reconciliation removes it as an orphan.
    assert within_bound(spec_fifo, specs.claim_uids) == {UID}
    device = PreparedDevice(
        AllocatedDevice(request="gpu", pool="node-1", device="gpu-0"),
        ContainerEdits(env={"GPU": "gpu-0"}),
    )
    claim = PreparedClaim(ClaimRef("default", "c", UID), (device,))
    within_bound(spec_fifo, lambda: specs.write(claim))
    assert spec_fifo.is_file()
    spec = specs.read(UID)
    assert spec is not None and spec["devices"][0]["name"] == f"{UID}-gpu-0"


def test_a_fifo_as_the_boot_id_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "boot_id"
    os.mkfifo(fifo)
    assert within_bound(fifo, lambda: current_boot_id(fifo)) == ""


def test_the_boot_id_is_read() -> None:
    boot_id = current_boot_id()
    assert len(boot_id) == 36 and boot_id.count("-") == 4

"""The guide's short examples of the contract work as shown: its partition and shared-device
inventories pass the model's checks and the real API server keeps them as published, and its
hook examples behave as the guide says when the core calls them."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

import dra_core
from dra_core import AllocatedClaim, AllocatedDevice, ClaimRef, Device, Inventory
from dra_core.kube.client import KubeClient
from dra_core.model import validate_inventory
from dra_core.plugins import from_objects
from dra_core.slices.build import build_slices
from dra_core.slices.features import probe

GUIDE = Path(__file__).parent.parent / "docs" / "backend-guide.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)


def run_block(first_line: str, **names: Any) -> dict[str, Any]:
    """Execute the guide's Python block whose first line is ``first_line``, with everything
    ``dra_core`` exports in scope (as a backend module imports it); its names."""
    (block,) = [b for b in python_blocks() if b.startswith(first_line)]
    scope: dict[str, Any] = {name: getattr(dra_core, name) for name in dra_core.__all__}
    scope.update(names)
    exec(compile(block, f"{GUIDE.name}: {first_line}", "exec"), scope)
    return scope


def hook_block(signature: str) -> Any:
    """The guide's example of the hook ``signature`` as a method of a backend class."""
    (block,) = [b for b in python_blocks() if f"def {signature}" in b]
    scope: dict[str, Any] = {name: getattr(dra_core, name) for name in dra_core.__all__}
    source = "class Backend:\n" + "".join(f"    {line}\n" for line in block.splitlines())
    exec(compile(source, f"{GUIDE.name}: {signature}", "exec"), scope)
    return scope["Backend"]


def inventories() -> dict[str, Inventory]:
    return {
        "partitions": run_block("# partitions")["npu"]("a1b2"),
        "shared": run_block("# shared")["shared"],
    }


@pytest.mark.parametrize("name", ["partitions", "shared"])
def test_the_inventories_pass_the_model(name: str) -> None:
    inventory = inventories()[name]
    validate_inventory(inventory)
    assert inventory.devices


@pytest.mark.controlplane
@pytest.mark.requires_feature("DRAPartitionableDevices", "DRAConsumableCapacity")
@pytest.mark.parametrize("name", ["partitions", "shared"])
def test_the_api_server_keeps_the_inventories(name: str, dra_kube_client: KubeClient) -> None:
    driver, node = "npu.example.com", "guide-node"
    server = probe(dra_kube_client, driver, node)
    slices = build_slices(
        driver, node, node, inventories()[name], 1,
        counters_beside_devices=server.counters_beside_devices,
    )  # fmt: skip
    for body in slices:
        kept = dra_kube_client.request(
            "POST", "/apis/resource.k8s.io/v1/resourceslices", body=body, query={"dryRun": "All"}
        )
        for field in ("devices", "sharedCounters"):
            assert kept["spec"].get(field) == body["spec"].get(field), f"{field} changed"


def claim(*devices: AllocatedDevice, name: str = "my-claim") -> AllocatedClaim:
    return AllocatedClaim(ClaimRef("default", name, str(uuid.uuid4())), devices)


def test_the_claim_edits_example_names_the_claims_devices() -> None:
    hooks = from_objects("npu", hook_block("dra_claim_edits")())
    c = claim(AllocatedDevice("r", "p", "w-0"), AllocatedDevice("r", "p", "w-1"), name="my-job.x")
    assert hooks.claim_edits(c, (), dra_core.NodeContext("n", "d")).env == {
        "WIDGETS_MY_JOB_X": "w-0,w-1"
    }


def test_the_check_allocation_example_refuses_a_held_device_only() -> None:
    hooks = from_objects("npu", hook_block("dra_check_allocation")())
    context = dra_core.NodeContext("n", "d")
    holder = dra_core.PreparedClaim(
        ClaimRef("default", "holder", str(uuid.uuid4())),
        (dra_core.PreparedDevice(AllocatedDevice("r", "p", "w-0")),),
    )
    prepared = dra_core.PreparedClaims((holder,))
    inventory = Inventory(devices=(Device("w-0"), Device("w-1")))
    with pytest.raises(dra_core.plugins.HookError, match="in use by claim default/holder"):
        hooks.check_allocation(
            claim(AllocatedDevice("r", "p", "w-0")), inventory, context, prepared
        )
    hooks.check_allocation(claim(AllocatedDevice("r", "p", "w-1")), inventory, context, prepared)
    monitor = AllocatedDevice("r", "p", "w-0", admin_access=True)
    hooks.check_allocation(claim(monitor), inventory, context, prepared)


def test_the_health_example_taints_hot_devices() -> None:
    backend = hook_block("dra_device_health")()
    backend.temperature = lambda name: 99 if name == "w-1" else 40
    (report,) = from_objects("npu", backend).device_health(
        Inventory(devices=(Device("w-0"), Device("w-1"))), dra_core.NodeContext("n", "d")
    )
    assert (report.device, report.reason, report.taint, report.effect) == (
        "w-1",
        "Overheating",
        "thermal",
        "NoExecute",
    )


def test_the_admin_access_example_says_which_allocation_monitors() -> None:
    backend = run_block("# admin access", hookimpl=dra_core.hookimpl, self=None)
    prepared = backend["dra_prepare"](
        None,
        claim(
            AllocatedDevice("r", "p", "w-0"), AllocatedDevice("m", "p", "w-1", admin_access=True)
        ),
    )
    assert [p.edits.env["NPU_MONITOR"] for p in prepared] == ["False", "True"]

"""Reading a ResourceClaim's allocation for this driver and node."""

from __future__ import annotations

import pytest

from dra_core import ClaimRef
from dra_core.kube.claims import ClaimError, parse_allocation

UID = "0b7f0c7e-4a55-4f0e-9d5e-0123456789ab"
REF = ClaimRef("default", "claim", UID)
DRIVER = "gpu.example.com"


def claim(results=None, config=None, uid=UID, allocated=True):
    body = {"metadata": {"name": "claim", "namespace": "default", "uid": uid}, "status": {}}
    if allocated:
        body["status"]["allocation"] = {
            "devices": {"results": results or [], "config": config or []}
        }
    return body


def result(device="gpu-0", request="gpu", driver=DRIVER, pool="node-1", **extra):
    return {"request": request, "driver": driver, "pool": pool, "device": device, **extra}


def test_takes_only_this_drivers_results_in_this_pool():
    allocation = parse_allocation(
        claim(
            [
                result("gpu-0"),
                result("gpu-1", driver="other.example.com"),
                result("gpu-2", pool="node-2"),
                result(
                    "gpu-3",
                    request="acc/vf",
                    shareID="9c1f6c1e-0000-4000-8000-000000000001",
                    consumedCapacity={"memory": "4Gi"},
                ),
            ]
        ),
        REF,
        DRIVER,
        {"node-1"},
    )
    assert [d.device for d in allocation.devices] == ["gpu-0", "gpu-3"]
    shared = allocation.devices[1]
    assert shared.base_request == "acc"
    assert shared.share_id == "9c1f6c1e-0000-4000-8000-000000000001"
    assert shared.consumed_capacity == {"memory": "4Gi"}


def test_configs_class_first_and_only_ours():
    allocation = parse_allocation(
        claim(
            [result()],
            config=[
                {
                    "source": "FromClaim",
                    "requests": ["gpu"],
                    "opaque": {"driver": DRIVER, "parameters": {"a": 2}},
                },
                {"source": "FromClass", "opaque": {"driver": DRIVER, "parameters": {"a": 1}}},
                {
                    "source": "FromClaim",
                    "opaque": {"driver": "other.example.com", "parameters": {"a": 3}},
                },
            ],
        ),
        REF,
        DRIVER,
        {"node-1"},
    )
    assert [c.parameters["a"] for c in allocation.configs] == [1, 2]
    assert allocation.configs[0].applies_to("anything")
    assert allocation.configs[1].applies_to("gpu/sub") and not allocation.configs[1].applies_to("x")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            claim([result()], uid="11111111-2222-3333-4444-555555555555"),
            "was replaced: the API server has UID 11111111-2222-3333-4444-555555555555",
        ),
        (claim(allocated=False), "is not allocated"),
        (
            claim([result(driver="other.example.com")]),
            "has no device of driver gpu.example.com in pool node-1",
        ),
        (claim([{"driver": DRIVER, "pool": "node-1"}]), "results[0] lacks request, pool or device"),
        (
            claim([result(consumedCapacity={"memory": 4})]),
            "consumedCapacity is not a map of quantities",
        ),
        (
            claim([result()], config=[{"opaque": {"driver": DRIVER, "parameters": "x"}}]),
            "parameters is not a JSON object",
        ),
        (
            claim(
                [result()],
                config=[{"opaque": {"driver": DRIVER, "parameters": {"x": "y" * 11000}}}],
            ),
            "over 10240",
        ),
        (
            {"metadata": {"uid": UID}, "status": {"allocation": {"devices": {"results": "nope"}}}},
            "field devices.results is str, expected list",
        ),
    ],
)
def test_bad_claims_give_clear_errors(body, message):
    with pytest.raises(ClaimError) as info:
        parse_allocation(body, REF, DRIVER, {"node-1"})
    assert message in str(info.value)

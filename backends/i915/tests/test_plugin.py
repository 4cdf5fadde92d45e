"""The hooks as the core calls them, through dra_core.plugins.from_objects."""

from __future__ import annotations

import pytest
from dra_backend_i915 import __main__ as cli
from dra_backend_i915 import testing
from dra_backend_i915.config import GpuConfig
from dra_backend_i915.testing import GIB, allocated_claim, build_demo, node_context

from dra_core import AllocationError, PreparedClaim
from dra_core.model import validate_inventory
from dra_core.plugins import HookError


def test_identity_options_classes(hooks):
    identity = hooks.backend_identity()
    assert (identity.driver_name, identity.cdi_kind) == ("gpu.intel.com", "intel.com/gpu")
    options = {o.name: o for o in hooks.backend_options()}
    assert set(options) == {"sysfs-root", "devfs-root", "vf-profile", "shared-gpus"}
    assert (options["sysfs-root"].default, options["sysfs-root"].env) == ("/sys", "SYSFS_ROOT")
    assert (options["devfs-root"].default, options["devfs-root"].env) == ("/dev", "DEVFS_ROOT")
    classes = {c.name: c.selectors for c in hooks.device_classes(identity)}
    assert set(classes) == {
        "gpu.intel.com",
        "vf.gpu.intel.com",
        "shared.gpu.intel.com",
        "monitoring.gpu.intel.com",
    }
    assert '.type == "gpu"' in classes["gpu.intel.com"][0]
    assert '.type == "vf"' in classes["vf.gpu.intel.com"][0]
    assert "device.allowMultipleAllocations == true" in classes["shared.gpu.intel.com"][0]
    assert '!("profile" in device.attributes' in classes["monitoring.gpu.intel.com"][0]


def test_decode_config_through_hooks(hooks, context):
    good = {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig"}
    assert isinstance(hooks.decode_config(good, context), GpuConfig)
    with pytest.raises(HookError) as error:
        hooks.decode_config({**good, "extra": 1}, context)
    assert isinstance(error.value.__cause__, ValueError)
    assert "extra" in str(error.value)


def test_start_checks_root_and_settings(hooks, fs, tmp_path):
    hooks.start(node_context(fs))
    with pytest.raises(HookError, match="does not exist: set --sysfs-root"):
        hooks.start(node_context(fs, sysfs_root=str(tmp_path / "nothing")))
    with pytest.raises(HookError, match="unknown model"):
        hooks.start(node_context(fs, vf_profile="a770=x"))


def test_demo_inventory_is_valid(hooks, tmp_path):
    fs = build_demo(tmp_path / "demo")
    inventory = hooks.discover(node_context(fs, tmp_path / "state"))
    validate_inventory(inventory)
    types = [d.attributes["type"] for d in inventory.devices]
    assert types.count("vf") == 8 and types.count("gpu") == 4


def test_whole_gpu_prepare_edits_and_exclusive(hooks, fs, context):
    fs.add_simpledrm()
    fs.add_gpu("0000:03:00.0", "0x56a0", lmem_total_bytes=16 * GIB)
    inventory = hooks.discover(context)
    first = allocated_claim("gpu-0000-03-00-0")
    hooks.check_allocation(first, inventory, context)
    (device,) = hooks.prepare(first, context)
    nodes = {n.path: n.host_path for n in device.edits.device_nodes}
    assert nodes == {
        "/dev/dri/card1": f"{fs.dev}/dri/card1",
        "/dev/dri/renderD128": f"{fs.dev}/dri/renderD128",
        "/dev/dri/by-path/pci-0000:03:00.0-card": f"{fs.dev}/dri/card1",
        "/dev/dri/by-path/pci-0000:03:00.0-render": f"{fs.dev}/dri/renderD128",
    }
    assert device.edits.env["DRI_RENDER_NODE"] == "/dev/dri/renderD128"
    assert device.edits.env["DRI_CARD_NODE_0000_03_00_0"] == "/dev/dri/card1"
    assert "GPU_SHARE_MEMORY_BYTES" not in device.edits.env
    second = allocated_claim("gpu-0000-03-00-0")
    with pytest.raises(HookError) as refused:
        hooks.check_allocation(second, inventory, context)
    assert isinstance(refused.value.__cause__, AllocationError)
    assert first.ref.uid in str(refused.value)
    hooks.unprepare(PreparedClaim(first.ref, (device,)), context)
    hooks.check_allocation(second, inventory, context)


def test_card_without_render_node(hooks, fs, context):
    fs.add_gpu("0000:03:00.0", "0x4905", render=False)
    (device,) = hooks.prepare(allocated_claim("gpu-0000-03-00-0"), context)
    assert [n.path for n in device.edits.device_nodes] == [
        "/dev/dri/card0",
        "/dev/dri/by-path/pci-0000:03:00.0-card",
    ]
    assert "DRI_RENDER_NODE" not in device.edits.env


def test_shared_gpu_prepare(hooks, fs, tmp_path):
    fs.add_gpu("0000:03:00.0", "0x56a0", lmem_total_bytes=16 * GIB)
    context = node_context(fs, tmp_path / "state", shared_gpus="all")
    inventory = hooks.discover(context)
    shares = [
        allocated_claim(
            "gpu-0000-03-00-0",
            consumed={"memory": "3Gi", "millicores": "300"},
            share_id="7f1c2c9e-3d5b-4a53-9a1e-9a8f3c1b2d4e",
        )
        for _ in range(2)
    ]
    for share in shares:
        hooks.check_allocation(share, inventory, context)
        (device,) = hooks.prepare(share, context)
        assert device.edits.env["GPU_SHARE_MEMORY_BYTES"] == str(3 * GIB)
        assert device.edits.env["GPU_SHARE_MILLICORES"] == "300"
        assert device.state["kind"] == "shared"


def test_admin_access_skips_exclusivity(hooks, fs, context):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    hooks.prepare(allocated_claim("gpu-0000-03-00-0"), context)
    monitor = allocated_claim("gpu-0000-03-00-0")
    monitor = type(monitor)(
        monitor.ref, tuple(type(d)(**{**d.__dict__, "admin_access": True}) for d in monitor.devices)
    )
    hooks.check_allocation(monitor, hooks.discover(context), context)


def test_unprepare_unknown_claim_is_fine(hooks, context, fs):
    fs.add_gpu("0000:03:00.0", "0x56a0")
    claim = allocated_claim("gpu-0000-03-00-0")
    hooks.unprepare(PreparedClaim(claim.ref, ()), context)


def test_corrupt_state_file_is_a_clear_error(hooks, fs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "i915-state.json").write_text("{not json")
    fs.add_gpu("0000:03:00.0", "0x56a0")
    with pytest.raises(HookError, match=r"i915-state\.json: not valid JSON"):
        hooks.start(node_context(fs, state))


def test_module_cli_prints_inventory(tmp_path, capsys, backend):
    assert testing.main([str(tmp_path / "demo")]) == 0
    assert testing.main([str(tmp_path / "demo")]) == 1  # not empty
    out = capsys.readouterr().out
    assert "dra-core discover --backend i915" in out
    code = cli.main(
        ["--sysfs-root", str(tmp_path / "demo/sys"), "--devfs-root", str(tmp_path / "demo/dev")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "gpu-0000-03-00-0-vf7" in out and "counterSets" in out
    assert cli.main(["--sysfs-root", str(tmp_path / "none")]) == 1


def test_an_unchanged_node_reuses_its_inventory_and_any_change_rebuilds_it(hooks, fs, context):
    fs.add_gpu("0000:03:00.0", "0x56a0", lmem_total_bytes=16 * GIB)
    first = hooks.discover(context)
    assert hooks.discover(context) is first, "nothing changed: not built and validated again"

    fs.add_gpu("0000:04:00.0", "0x56a0", lmem_total_bytes=16 * GIB)  # sysfs changed
    second = hooks.discover(context)
    assert [d.name for d in second.devices] == ["gpu-0000-03-00-0", "gpu-0000-04-00-0"]

    shared = node_context(fs, context.state_dir, shared_gpus="0000:04:00.0")  # settings changed
    third = hooks.discover(shared)
    assert third is not second
    assert {d.name: d.allow_multiple_allocations for d in third.devices} == {
        "gpu-0000-03-00-0": False,
        "gpu-0000-04-00-0": True,
    }
    assert hooks.discover(shared) is third

"""CDI spec files: content, names and IDs, minimum versions, validation, files and orphans."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dra_core.cdi import CdiError, CdiSpecs, minimum_version
from dra_core.model import (
    AllocatedDevice,
    BackendIdentity,
    ClaimRef,
    ContainerEdits,
    DeviceNode,
    Mount,
    PreparedClaim,
    PreparedDevice,
)

UID = "a1b2c3d4-0000-1111-2222-333344445555"
UID_DIGIT = "11111111-2222-3333-4444-555555555555"
IDENTITY = BackendIdentity(
    driver_name="gpu.example.com", cdi_vendor="k8s.gpu.example.com", cdi_class="gpu"
)


def _device(
    name: str = "gpu-0",
    share_id: str | None = None,
    edits: ContainerEdits | None = None,
) -> PreparedDevice:
    return PreparedDevice(
        allocation=AllocatedDevice(request="gpu", pool="node-1", device=name, share_id=share_id),
        edits=edits if edits is not None else ContainerEdits(env={"GPU": name}),
    )


def _claim(*devices: PreparedDevice, uid: str = UID) -> PreparedClaim:
    return PreparedClaim(ref=ClaimRef("default", "c", uid), devices=devices)


@pytest.fixture
def specs(tmp_path: Path) -> CdiSpecs:
    return CdiSpecs(tmp_path / "cdi", IDENTITY)


def test_names_ids_and_path(specs: CdiSpecs, tmp_path: Path) -> None:
    dev = _device("gpu-0")
    assert specs.device_name(UID, dev) == f"{UID}-gpu-0"
    assert specs.device_id(UID, dev) == f"k8s.gpu.example.com/gpu={UID}-gpu-0"
    shared = _device("gpu-0", share_id="5f1c2")
    assert specs.device_name(UID, shared) == f"{UID}-gpu-0-5f1c2"
    assert specs.spec_path(UID) == tmp_path / "cdi" / f"k8s.gpu.example.com-gpu_{UID}.json"


def test_build_full_content(specs: CdiSpecs) -> None:
    edits = ContainerEdits(
        env={"A": "1", "B": "x=y", "EMPTY": ""},
        device_nodes=(
            DeviceNode(path="/dev/dri/renderD128", type="c", major=226, minor=128),
            DeviceNode(path="/dev/dri/card1", host_path="/dev/dri/card0", permissions="rw"),
            DeviceNode(path="/dev/x", major=0, minor=0),
        ),
        mounts=(
            Mount(host_path="/sys/a", container_path="/sys/b"),
            Mount(host_path="tmpfs", container_path="/scratch", options=(), type="tmpfs"),
        ),
    )
    spec = specs.build(_claim(_device("gpu-0", edits=edits)))
    assert spec == {
        "cdiVersion": "0.5.0",
        "kind": "k8s.gpu.example.com/gpu",
        "devices": [
            {
                "name": f"{UID}-gpu-0",
                "containerEdits": {
                    "env": ["A=1", "B=x=y", "EMPTY="],
                    "deviceNodes": [
                        {"path": "/dev/dri/renderD128", "type": "c", "major": 226, "minor": 128},
                        {
                            "path": "/dev/dri/card1",
                            "hostPath": "/dev/dri/card0",
                            "permissions": "rw",
                        },
                        {"path": "/dev/x", "major": 0, "minor": 0},
                    ],
                    "mounts": [
                        {
                            "hostPath": "/sys/a",
                            "containerPath": "/sys/b",
                            "options": ["ro", "nosuid", "nodev", "bind"],
                        },
                        {"hostPath": "tmpfs", "containerPath": "/scratch", "type": "tmpfs"},
                    ],
                },
            }
        ],
    }


def test_zero_devices_and_empty_edits_need_no_spec(specs: CdiSpecs) -> None:
    assert specs.build(_claim()) is None
    bare = _device("gpu-1", edits=ContainerEdits())
    assert specs.build(_claim(bare)) is None
    assert specs.write(_claim(bare)) == {("gpu-1", None): ()}
    assert not specs.exists(UID)
    # a device without edits is left out, the others stay
    spec = specs.build(_claim(bare, _device("gpu-2")))
    assert spec is not None
    assert [d["name"] for d in spec["devices"]] == [f"{UID}-gpu-2"]


def test_write_returns_ids_per_device_and_share(specs: CdiSpecs) -> None:
    claim = _claim(
        _device("gpu-0", share_id="s1"),
        _device("gpu-0", share_id="s2"),
        _device("gpu-1"),
    )
    ids = specs.write(claim)
    kind = "k8s.gpu.example.com/gpu"
    assert ids == {
        ("gpu-0", "s1"): (f"{kind}={UID}-gpu-0-s1",),
        ("gpu-0", "s2"): (f"{kind}={UID}-gpu-0-s2",),
        ("gpu-1", None): (f"{kind}={UID}-gpu-1",),
    }
    assert specs.cdi_ids(claim) == ids
    written = specs.read(UID)
    assert written is not None
    assert written == specs.build(claim)
    assert {d["name"] for d in written["devices"]} == {
        f"{UID}-gpu-0-s1",
        f"{UID}-gpu-0-s2",
        f"{UID}-gpu-1",
    }


def test_duplicate_names_rejected(specs: CdiSpecs) -> None:
    with pytest.raises(CdiError, match="used twice"):
        specs.build(_claim(_device("gpu-0"), _device("gpu-0")))


def test_write_mode_atomic_and_idempotent(specs: CdiSpecs) -> None:
    claim = _claim(_device())
    specs.write(claim)
    path = specs.spec_path(UID)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    specs.write(claim)
    assert path.stat().st_ino == inode  # unchanged content is not rewritten
    path.chmod(0o600)
    specs.write(claim)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    specs.write(_claim(_device(edits=ContainerEdits(env={"GPU": "other"}))))
    assert path.stat().st_ino != inode
    assert sorted(os.listdir(specs.directory)) == [path.name]
    assert json.loads(path.read_text())["devices"][0]["containerEdits"]["env"] == ["GPU=other"]


def test_remove_and_exists_idempotent(specs: CdiSpecs) -> None:
    assert specs.remove(UID) is False
    specs.write(_claim(_device()))
    assert specs.exists(UID)
    assert specs.remove(UID) is True
    assert not specs.exists(UID)
    assert specs.remove(UID) is False
    assert specs.read(UID) is None


@pytest.mark.parametrize(
    "bad_uid", ["../x", "../../etc/passwd", "", "abc", f"{UID}/..", f"{UID}\n", UID + "0"]
)
def test_uid_validation(specs: CdiSpecs, bad_uid: str) -> None:
    with pytest.raises(CdiError, match="not a UUID"):
        specs.spec_path(bad_uid)
    with pytest.raises(CdiError, match="not a UUID"):
        specs.remove(bad_uid)
    with pytest.raises(CdiError, match="not a UUID"):
        specs.write(_claim(_device(), uid=bad_uid))
    assert not specs.directory.exists()


# --- minimum versions --------------------------------------------------------------------------


def _spec(kind: str = "v.example.com/gpu", name: str = "dev", **edits: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "devices": [{"name": name, "containerEdits": {"env": ["A=1"], **edits}}],
    }


@pytest.mark.parametrize(
    ("spec", "version"),
    [
        (_spec(), "0.3.0"),
        (_spec(mounts=[{"hostPath": "/a", "containerPath": "/b"}]), "0.3.0"),
        (_spec(mounts=[{"hostPath": "/a", "containerPath": "/b", "type": "bind"}]), "0.4.0"),
        (_spec(deviceNodes=[{"path": "/dev/a"}]), "0.3.0"),
        (_spec(deviceNodes=[{"path": "/dev/a", "hostPath": "/dev/b"}]), "0.5.0"),
        (_spec(name="0dev"), "0.5.0"),
        ({**_spec(), "annotations": {"a": "b"}}, "0.6.0"),
        (
            {"kind": "v/c", "devices": [{"name": "d", "annotations": {"a": "b"}}]},
            "0.6.0",
        ),
        (_spec(kind="vendor.com/class.sub"), "0.6.0"),
        (_spec(additionalGids=[44]), "0.7.0"),
        (_spec(intelRdt={"closID": "x"}), "0.7.0"),
        (_spec(intelRdt={"schemata": ["L3:0=f"]}), "1.1.0"),
        (_spec(netDevices=[{"hostInterfaceName": "eth1", "name": "net0"}]), "1.1.0"),
        (
            {
                **_spec(mounts=[{"hostPath": "/a", "containerPath": "/b", "type": "bind"}]),
                "containerEdits": {"additionalGids": [5]},
            },
            "0.7.0",
        ),
    ],
)
def test_minimum_version(spec: dict[str, Any], version: str) -> None:
    assert minimum_version(spec) == version


def test_written_version_is_the_minimum(specs: CdiSpecs) -> None:
    letter_uid = "abcdef00-0000-1111-2222-333344445555"
    plain = specs.build(_claim(_device(), uid=letter_uid))
    assert plain is not None
    assert plain["cdiVersion"] == "0.3.0"
    digit = specs.build(_claim(_device(), uid=UID_DIGIT))
    assert digit is not None
    assert digit["cdiVersion"] == "0.5.0"
    mount = _device(edits=ContainerEdits(mounts=(Mount("/a", "/b", type="bind"),)))
    with_type = specs.build(_claim(mount, uid=letter_uid))
    assert with_type is not None
    assert with_type["cdiVersion"] == "0.4.0"
    assert specs.minimum_version(with_type) == "0.4.0"
    dotted = CdiSpecs(specs.directory, BackendIdentity("d.example.com", "example.com", "gpu.v2"))
    spec = dotted.build(_claim(_device(), uid=letter_uid))
    assert spec is not None
    assert spec["cdiVersion"] == "0.6.0"


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "cls"),
    [("", "gpu"), ("1vendor", "gpu"), ("vendor-", "gpu"), ("ven/dor", "gpu"), ("v", "g" * 64)],
)
def test_bad_vendor_or_class(tmp_path: Path, vendor: str, cls: str) -> None:
    with pytest.raises(CdiError, match=r"CDI (vendor|class)"):
        CdiSpecs(tmp_path, BackendIdentity("d.example.com", vendor, cls))


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        (_device("gpu 0"), "CDI device name"),
        (_device("gpu-0", share_id="bad/share"), "share 'bad/share'"),
        (_device(edits=ContainerEdits(env={"A=B": "1"})), "environment variable name"),
        (_device(edits=ContainerEdits(env={"": "1"})), "environment variable name"),
        (_device(edits=ContainerEdits(env={"A": "x\0y"})), "NUL"),
        (_device(edits=ContainerEdits(device_nodes=(DeviceNode("dev/x"),))), "not absolute"),
        (
            _device(edits=ContainerEdits(device_nodes=(DeviceNode("/dev/x", permissions="rx"),))),
            "permissions",
        ),
        (_device(edits=ContainerEdits(mounts=(Mount("", "/b"),))), "hostPath and containerPath"),
    ],
)
def test_bad_edits_name_claim_and_device(
    specs: CdiSpecs, device: PreparedDevice, problem: str
) -> None:
    with pytest.raises(CdiError) as info:
        specs.write(_claim(device))
    message = str(info.value)
    assert problem in message
    assert UID in message
    assert repr(device.allocation.device) in message
    assert not specs.exists(UID)


def test_permissions_accepted(specs: CdiSpecs) -> None:
    for perms in ("r", "rw", "rwm", "mrw", "none"):
        node = DeviceNode("/dev/x", permissions=perms)
        assert specs.build(_claim(_device(edits=ContainerEdits(device_nodes=(node,))))) is not None


# --- orphans and temp files --------------------------------------------------------------------


def test_claim_uids_ignores_others(specs: CdiSpecs) -> None:
    uid2 = "bbbbbbbb-0000-1111-2222-333344445555"
    specs.write(_claim(_device()))
    specs.write(_claim(_device(), uid=uid2))
    d = specs.directory
    other = CdiSpecs(d, BackendIdentity("o.example.com", "k8s.other.example.com", "gpu"))
    other.write(_claim(_device(), uid="cccccccc-0000-1111-2222-333344445555"))
    (d / f".k8s.gpu.example.com-gpu_{UID}.json.0123456789abcdef.tmp").write_text("{")
    (d / "k8s.gpu.example.com-gpu_common.json").write_text("{}")
    (d / "k8s.gpu.example.com-gpu_not-a-uid.json").write_text("{}")
    (d / f"k8s.gpu.example.com-gpu_{UID}.yaml").write_text("x")
    # same file name pattern, foreign kind (vendor "k8s.gpu.example.com-gpu" is ambiguous)
    foreign = "dddddddd-0000-1111-2222-333344445555"
    (d / f"k8s.gpu.example.com-gpu_{foreign}.json").write_text(
        json.dumps({"cdiVersion": "0.3.0", "kind": "k8s.gpu.example.com-gpu/x", "devices": []})
    )
    # ours by name but unparsable: counted, so orphan collection removes it
    broken = "eeeeeeee-0000-1111-2222-333344445555"
    (d / f"k8s.gpu.example.com-gpu_{broken}.json").write_text("{")
    assert specs.claim_uids() == {UID, uid2, broken}
    with pytest.raises(CdiError, match="not valid JSON"):
        specs.read(broken)


def test_claim_uids_missing_directory(specs: CdiSpecs) -> None:
    assert specs.claim_uids() == set()
    assert specs.remove_stale_temp_files() == []


def test_remove_stale_temp_files(specs: CdiSpecs) -> None:
    specs.write(_claim(_device()))
    d = specs.directory
    ours = d / f".k8s.gpu.example.com-gpu_{UID}.json.0123456789abcdef.tmp"
    fresh = d / f".k8s.gpu.example.com-gpu_{UID}.json.fedcba9876543210.tmp"
    theirs = d / f".k8s.other.example.com-gpu_{UID}.json.0123456789abcdef.tmp"
    for p in (ours, fresh, theirs):
        p.write_text("{")
    for p in (ours, theirs):
        os.utime(p, (1, 1))
    assert specs.remove_stale_temp_files() == [ours]
    assert fresh.exists()
    assert theirs.exists()
    assert specs.exists(UID)


def test_claim_edits_are_one_claim_device_every_device_names(specs: CdiSpecs) -> None:
    bare = _device("gpu-1", edits=ContainerEdits())
    claim = PreparedClaim(
        ref=ClaimRef("default", "c", UID),
        devices=(_device("gpu-0"), bare),
        edits=ContainerEdits(env={"CLAIM_DEVICES": "gpu-0,gpu-1"}),
    )
    kind = "k8s.gpu.example.com/gpu"
    claim_id = f"{kind}=claim-{UID}"
    assert specs.write(claim) == {
        ("gpu-0", None): (f"{kind}={UID}-gpu-0", claim_id),
        ("gpu-1", None): (claim_id,),  # no edits of its own, still the claim's
    }
    spec = specs.read(UID)
    assert spec is not None
    assert spec["devices"][-1] == {
        "name": f"claim-{UID}",
        "containerEdits": {"env": ["CLAIM_DEVICES=gpu-0,gpu-1"]},
    }
    # claim edits alone make a spec; a bad one names the claim, not a device
    alone = PreparedClaim(claim.ref, (bare,), ContainerEdits(env={"A=B": "x"}))
    with pytest.raises(CdiError, match=r"claim .*: the claim's own edits: environment variable"):
        specs.build(alone)

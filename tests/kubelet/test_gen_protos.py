"""The committed generated code matches the .proto files (needs the proto extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed (pip install -e '.[proto]')",
)
def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_descriptors_load_side_by_side() -> None:
    from dra_core.kubelet.proto import (
        dra_v1_pb2,
        dra_v1beta1_pb2,
        health_v1alpha1_pb2,
        pluginregistration_pb2,
    )

    services = {
        dra_v1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"].full_name,
        dra_v1beta1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"].full_name,
        health_v1alpha1_pb2.DESCRIPTOR.services_by_name["DRAResourceHealth"].full_name,
        pluginregistration_pb2.DESCRIPTOR.services_by_name["Registration"].full_name,
    }
    assert services == {
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
        "v1alpha1.DRAResourceHealth",
        "pluginregistration.Registration",
    }
    share_id = dra_v1_pb2.Device.DESCRIPTOR.fields_by_name["share_id"]
    assert share_id.number == 5 and share_id.has_presence
    assert "share_id" not in dra_v1beta1_pb2.Device.DESCRIPTOR.fields_by_name
    message = health_v1alpha1_pb2.DeviceHealth.DESCRIPTOR.fields_by_name["message"]
    assert message.number == 5

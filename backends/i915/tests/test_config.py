"""Opaque config and node settings: strict decoding, errors naming the field."""

from __future__ import annotations

import pytest
from dra_backend_i915.config import GpuConfig, decode_opaque, parse_shared, settings_from

GOOD = {"apiVersion": "gpu.intel.com/v1alpha1", "kind": "GpuConfig", "vfProfile": "flex170_m4"}


def test_good_config():
    config = decode_opaque(GOOD)
    assert isinstance(config, GpuConfig) and config.vf_profile == "flex170_m4"
    assert decode_opaque({k: v for k, v in GOOD.items() if k != "vfProfile"}).vf_profile is None


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"vfProfil": "x"}, "vfProfil", "unknown field"),
        ({"vfProfile": 4}, "vfProfile", "string"),
        ({"vfProfile": "flex170_m3"}, "vfProfile", "unknown VF profile"),
        ({"apiVersion": "gpu.intel.com/v1"}, "apiVersion", "gpu.intel.com/v1alpha1"),
        ({"kind": "VfConfig"}, "kind", "GpuConfig"),
    ],
)
def test_bad_config_names_the_field(change, field, text):
    with pytest.raises(ValueError, match="invalid GpuConfig") as error:
        decode_opaque({**GOOD, **change})
    assert field in str(error.value) and text in str(error.value)


def test_missing_and_wrong_shape():
    with pytest.raises(ValueError, match="apiVersion: Field required"):
        decode_opaque({"kind": "GpuConfig"})
    with pytest.raises(ValueError, match="expected a JSON object"):
        decode_opaque(["GpuConfig"])  # type: ignore[arg-type]


def test_settings_merge_options_over_config():
    settings = settings_from(
        {"sysfs_root": "/host/sys", "vf_profile": "flex170=flex170_m2", "shared_gpus": None},
        {"vfProfiles": {"flex170": "flex170_m4", "max_48g": "none"}, "sharedGpus": ["0x56a0"]},
    )
    assert str(settings.sysfs_root) == "/host/sys" and str(settings.devfs_root) == "/dev"
    assert dict(settings.vf_profiles) == {"flex170": "flex170_m2", "max_48g": "none"}
    assert settings.shared.selects("0000:99:00.0", "0x56a0")


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({"vfTimeout": 3}, "vfTimeout: unknown field"),
        ({"vfTimeoutSeconds": 0}, "vfTimeoutSeconds"),
        ({"sharedGpus": 3}, "sharedGpus"),
        ({"vfProfiles": {"flex170": "max_48g_c8"}}, "not a flex170 profile"),
    ],
)
def test_bad_settings(config, text):
    with pytest.raises(ValueError, match=text):
        settings_from({}, config)


def test_shared_selection():
    assert not parse_shared("none").selects("0000:03:00.0", "0x56a0")
    assert parse_shared("all").selects("0000:03:00.0", "0x56a0")
    chosen = parse_shared("0000:03:00.0, 0x56C0")
    assert chosen.selects("0000:03:00.0", "0x1111") and chosen.selects("x", "0x56c0")
    assert not chosen.selects("0000:04:00.0", "0x56a0")
    with pytest.raises(ValueError, match="not none, all, a PCI address"):
        parse_shared("card0")


def test_option_keys_with_dashes_as_the_cli_passes_them():
    settings = settings_from(
        {
            "sysfs-root": "/s",
            "devfs-root": "/d",
            "vf-profile": "flex140=none",
            "shared-gpus": "all",
        },
        {},
    )
    assert (str(settings.sysfs_root), str(settings.devfs_root)) == ("/s", "/d")
    assert dict(settings.vf_profiles) == {"flex140": "none"}
    assert settings.shared.all

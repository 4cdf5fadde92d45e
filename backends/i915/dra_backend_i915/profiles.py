"""SR-IOV VF profiles per GPU model: how many VFs a PF is split into and each VF's quotas.

i915 profiles (Flex 170/140, Max 1550/1450 and 1100) carry the quotas Intel's driver wrote to
``prelim_iov/vfK/<gt>/``: ``lmem_quota`` (per tile, with an ECC-on variant), ``ggtt_quota``,
``doorbells_quota``, ``contexts_quota`` (1024), ``exec_quantum_ms`` and ``preempt_timeout_us``.
On two-tile Max ``lmem_quota`` is a per-tile figure written to both GT directories (a VF gets
twice ``lmem_quota``), while ``doorbells_quota`` and ``ggtt_quota`` are per-VF figures that
:mod:`dra_backend_i915.sriov` divides by the number of tiles, as Intel's driver does (each
tile has its own doorbells and GGTT).

xe profiles (Arc Pro B-series) split the card's VF memory pool equally (``vram_quota`` in
``sriov_admin/vfN/profile/``), with the Flexible scheduling preset (``exec_quantum_ms`` =
max(32 // N, 1), ``preempt_timeout_us`` = 128000 for one VF, else max(64000 // N, 16000)).

The default per model follows Intel's driver for i915 parts; for xe parts it is four VFs (our
choice). An operator overrides it per node with ``--vf-profile MODEL=PROFILE`` or the backend
configuration; the value ``none`` turns the partitioning off for that model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dra_backend_i915.pciids import lookup, normalize_device_id

__all__ = (
    "DEFAULTS",
    "NONE",
    "PROFILES",
    "Profile",
    "ProfileError",
    "choose",
    "parse_overrides",
    "profiles_for",
)

MIB = 1 << 20
#: The override value that turns SR-IOV partitioning off for a model.
NONE = "none"


class ProfileError(ValueError):
    """An unknown profile or model, or a profile of another model."""


@dataclass(frozen=True)
class Profile:
    """One way of splitting a PF into VFs."""

    name: str
    #: The model key (``flex170``), as in :mod:`dra_backend_i915.pciids`.
    key: str
    #: ``i915`` (prelim_iov quotas) or ``xe`` (sriov_admin profile).
    driver: str
    num_vfs: int
    #: Local memory per VF and per tile, in bytes (ECC off / on).
    lmem_bytes: int
    lmem_bytes_ecc: int
    tiles: int = 1
    doorbells: int = 0
    ggtt: int = 0
    contexts: int = 1024
    exec_quantum_ms: int = 0
    preempt_timeout_us: int = 0

    def vf_memory(self, *, ecc: bool) -> int:
        """Bytes of local memory one VF gets, over all tiles."""
        return (self.lmem_bytes_ecc if ecc else self.lmem_bytes) * self.tiles


def _i915(
    key: str, prefix: str, tiles: int, rows: list[tuple[int, int, int, int, int, int, int]]
) -> dict[str, Profile]:
    result = {}
    for count, lmem, lmem_ecc, doorbells, ggtt, eq, pt in rows:
        name = f"{prefix}{count}"
        result[name] = Profile(
            name=name,
            key=key,
            driver="i915",
            num_vfs=count,
            lmem_bytes=lmem * MIB,
            lmem_bytes_ecc=lmem_ecc * MIB,
            tiles=tiles,
            doorbells=doorbells,
            ggtt=ggtt,
            exec_quantum_ms=eq,
            preempt_timeout_us=pt,
        )
    return result


def _xe(key: str, pool: int, pool_ecc: int, max_vfs: int) -> dict[str, Profile]:
    result = {}
    for count in (1, 2, 4, 8, 12, 24):
        if count > max_vfs:
            continue
        name = f"{key}_m{count}"
        result[name] = Profile(
            name=name,
            key=key,
            driver="xe",
            num_vfs=count,
            lmem_bytes=pool // count // MIB * MIB,
            lmem_bytes_ecc=pool_ecc // count // MIB * MIB,
            exec_quantum_ms=max(32 // count, 1),
            preempt_timeout_us=128000 if count == 1 else max(64000 // count, 16000),
        )
    return result


_GGTT = 4026531840
PROFILES: Mapping[str, Profile] = {
    **_i915(
        "flex170",
        "flex170_m",
        1,
        [
            (1, 16000, 13542, 240, _GGTT, 64, 128000),
            (2, 8000, 6770, 120, 2013265920, 32, 64000),
            (4, 4000, 3384, 60, 1006632960, 16, 32000),
            (5, 3200, 2708, 48, 805306368, 12, 24000),
            (8, 2000, 1692, 30, 503316480, 8, 16000),
            (16, 1000, 846, 15, 251658240, 4, 8000),
        ],
    ),
    **_i915(
        "flex140",
        "flex140_m",
        1,
        [
            (1, 5760, 4654, 240, _GGTT, 64, 128000),
            (3, 1920, 1550, 80, 1342177280, 22, 44000),
            (6, 960, 774, 40, 671088640, 16, 32000),
            (12, 480, 386, 20, 335544320, 8, 16000),
        ],
    ),
    **_i915(
        "max_128g",
        "max_128g_c",
        2,
        [
            (1, 61440, 61440, 240, _GGTT, 64, 128000),
            (2, 30720, 30720, 240, 2013265920, 64, 128000),
            (4, 15360, 15360, 120, 1006632960, 64, 128000),
            (8, 7680, 7680, 60, 503316480, 32, 64000),
            (16, 3840, 3840, 30, 251658240, 16, 32000),
            (32, 1920, 1920, 15, 125829120, 8, 16000),
            (62, 990, 990, 7, 64880640, 4, 8000),
        ],
    ),
    **_i915(
        "max_48g",
        "max_48g_c",
        1,
        [
            (1, 45056, 45056, 240, _GGTT, 64, 128000),
            (2, 22528, 22528, 120, 2013265920, 64, 128000),
            (4, 11264, 11264, 60, 1006632960, 64, 128000),
            (8, 5632, 5632, 30, 503316480, 32, 64000),
            (16, 2816, 2816, 15, 251658240, 16, 32000),
            (32, 1408, 1408, 7, 125829120, 8, 16000),
            (63, 704, 704, 3, 63897600, 4, 8000),
        ],
    ),
    **_xe("pro_b60", 25367150592, 21500002304, 24),
    **_xe("pro_b50", 16911433728, 16911433728, 24),
    **_xe("pro_b65", 33285996544, 33285996544, 24),
    **_xe("pro_b70", 29771169792, 29771169792, 12),
}

#: The default profile per model key.
DEFAULTS: Mapping[str, str] = {
    "flex170": "flex170_m8",
    "flex140": "flex140_m6",
    "max_128g": "max_128g_c16",
    "max_48g": "max_48g_c8",
    "pro_b60": "pro_b60_m4",
    "pro_b50": "pro_b50_m4",
    "pro_b65": "pro_b65_m4",
    "pro_b70": "pro_b70_m4",
}


def profiles_for(key: str) -> list[Profile]:
    """Every profile of a model key, fewest VFs first."""
    return sorted((p for p in PROFILES.values() if p.key == key), key=lambda p: p.num_vfs)


def _model_key(model: str) -> str:
    """``flex170``, ``Flex 170`` or ``0x56c0`` -> the profile key."""
    text = model.strip()
    if text.lower().startswith("0x"):
        try:
            key = lookup(normalize_device_id(text)).profile_key
        except ValueError:
            key = ""
        if not key:
            msg = f"PCI ID {text} has no SR-IOV profiles (known models: {', '.join(DEFAULTS)})"
            raise ProfileError(msg)
        return key
    key = text.lower().replace(" ", "").replace("-", "_")
    if key not in DEFAULTS:
        msg = f"unknown model {model!r} for VF profiles; use one of {', '.join(DEFAULTS)}"
        raise ProfileError(msg)
    return key


def parse_overrides(text: str | None) -> dict[str, str]:
    """``"flex170=flex170_m4,max_48g=none"`` -> ``{"flex170": "flex170_m4", ...}``, checked."""
    result: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, profile = item.partition("=")
        if not sep or not profile.strip():
            msg = f"--vf-profile entry {item!r} is not MODEL=PROFILE (e.g. flex170=flex170_m4)"
            raise ProfileError(msg)
        key = _model_key(model)
        result[key] = _check(key, profile.strip())
    return result


def _check(key: str, profile: str) -> str:
    if profile == NONE:
        return profile
    found = PROFILES.get(profile)
    if found is None or found.key != key:
        names = ", ".join(p.name for p in profiles_for(key))
        msg = f"profile {profile!r} is not a {key} profile; choose one of {names} or {NONE}"
        raise ProfileError(msg)
    return profile


def choose(key: str, overrides: Mapping[str, str], total_vfs: int) -> Profile | None:
    """The profile to publish for a PF of model ``key`` with ``sriov_totalvfs`` VFs.

    None when the model has no profiles, the operator chose ``none``, or the profile needs
    more VFs than the PF offers (``i915.max_vfs`` too low).
    """
    name = overrides.get(key) or DEFAULTS.get(key)
    if name is None or name == NONE:
        return None
    profile = PROFILES[name]
    if profile.num_vfs > total_vfs:
        return None
    return profile

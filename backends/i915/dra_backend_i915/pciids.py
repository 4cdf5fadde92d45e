"""PCI device IDs of Intel GPUs: model name, family, usual kernel driver and VF profile key.

The table covers the data-center parts (Max, Flex), discrete Arc A/B (and Pro) cards, Iris Xe
MAX and the common integrated GPUs. An ID not in the table is still published, with model and
family ``unknown``: a new part must not disappear because this table is older than it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("UNKNOWN", "ModelInfo", "lookup", "normalize_device_id")


@dataclass(frozen=True)
class ModelInfo:
    """What the PCI device ID tells about a GPU."""

    #: Marketing model, e.g. ``"Flex 170"``.
    model: str
    #: Product family, e.g. ``"Data Center GPU Flex"``.
    family: str
    #: The kernel driver the part is normally used with (``i915`` or ``xe``).
    default_driver: str
    #: Whether the part has device-local memory (integrated GPUs do not).
    local_memory: bool = True
    #: Key of the VF profile table (:mod:`dra_backend_i915.profiles`), or "" for none.
    profile_key: str = ""


#: Model information for an ID the table does not know.
UNKNOWN = ModelInfo(model="unknown", family="unknown", default_driver="")

_MAX = "Data Center GPU Max"
_FLEX = "Data Center GPU Flex"
_ARC_A = "Arc A-Series"
_ARC_PRO_A = "Arc Pro A-Series"
_ARC_B = "Arc B-Series"
_ARC_PRO_B = "Arc Pro B-Series"
_DG1 = "Iris Xe MAX"
_INTEGRATED = "Integrated"


def _integrated(model: str, driver: str = "i915") -> ModelInfo:
    return ModelInfo(model, _INTEGRATED, driver, local_memory=False)


_TABLE: dict[int, ModelInfo] = {
    # Data Center GPU Max (Ponte Vecchio): two tiles on 1550/1450, one on 1100.
    0x0BD0: ModelInfo("Max 1550", _MAX, "i915", profile_key="max_128g"),
    0x0B69: ModelInfo("Max 1550", _MAX, "i915", profile_key="max_128g"),
    0x0BD5: ModelInfo("Max 1550", _MAX, "i915", profile_key="max_128g"),
    0x0BD4: ModelInfo("Max 1550", _MAX, "i915", profile_key="max_128g"),
    0x0BD6: ModelInfo("Max 1450", _MAX, "i915", profile_key="max_128g"),
    0x0BD9: ModelInfo("Max 1100", _MAX, "i915", profile_key="max_48g"),
    0x0BDA: ModelInfo("Max 1100", _MAX, "i915", profile_key="max_48g"),
    0x0BDB: ModelInfo("Max 1100", _MAX, "i915", profile_key="max_48g"),
    0x0B6E: ModelInfo("Max 1100", _MAX, "i915", profile_key="max_48g"),
    # Data Center GPU Flex (Arctic Sound-M).
    0x56C0: ModelInfo("Flex 170", _FLEX, "i915", profile_key="flex170"),
    0x56C2: ModelInfo("Flex 170", _FLEX, "i915", profile_key="flex170"),
    0x56C1: ModelInfo("Flex 140", _FLEX, "i915", profile_key="flex140"),
    # Arc A-Series and Arc Pro A-Series (Alchemist, DG2).
    0x56A0: ModelInfo("Arc A770", _ARC_A, "i915"),
    0x56A1: ModelInfo("Arc A750", _ARC_A, "i915"),
    0x56A2: ModelInfo("Arc A580", _ARC_A, "i915"),
    0x56A5: ModelInfo("Arc A380", _ARC_A, "i915"),
    0x56A6: ModelInfo("Arc A310", _ARC_A, "i915"),
    0x56B0: ModelInfo("Arc Pro A30M", _ARC_PRO_A, "i915"),
    0x56B1: ModelInfo("Arc Pro A40/A50", _ARC_PRO_A, "i915"),
    0x56B2: ModelInfo("Arc Pro A60M", _ARC_PRO_A, "i915"),
    0x56B3: ModelInfo("Arc Pro A60", _ARC_PRO_A, "i915"),
    # Arc B-Series and Arc Pro B-Series (Battlemage), xe only.
    0xE20B: ModelInfo("Arc B580", _ARC_B, "xe"),
    0xE20C: ModelInfo("Arc B570", _ARC_B, "xe"),
    0xE211: ModelInfo("Arc Pro B60", _ARC_PRO_B, "xe", profile_key="pro_b60"),
    0xE212: ModelInfo("Arc Pro B50", _ARC_PRO_B, "xe", profile_key="pro_b50"),
    0xE222: ModelInfo("Arc Pro B65", _ARC_PRO_B, "xe", profile_key="pro_b65"),
    0xE223: ModelInfo("Arc Pro B70", _ARC_PRO_B, "xe", profile_key="pro_b70"),
    # Iris Xe MAX (DG1) and its server sibling SG1.
    0x4905: ModelInfo("Iris Xe MAX", _DG1, "i915"),
    0x4906: ModelInfo("Iris Xe MAX", _DG1, "i915"),
    0x4908: ModelInfo("Iris Xe MAX", _DG1, "i915"),
    0x4909: ModelInfo("Iris Xe MAX", _DG1, "i915"),
    0x4907: ModelInfo("Server GPU SG1", _DG1, "i915"),
    # Integrated GPUs.
    0x9A49: _integrated("Iris Xe (Tiger Lake)"),
    0x9A40: _integrated("Iris Xe (Tiger Lake)"),
    0x9A60: _integrated("UHD Graphics (Tiger Lake-H)"),
    0x9A78: _integrated("UHD Graphics (Tiger Lake)"),
    0x4680: _integrated("UHD Graphics 770 (Alder Lake-S)"),
    0x4690: _integrated("UHD Graphics 770 (Alder Lake-S)"),
    0x4692: _integrated("UHD Graphics 730 (Alder Lake-S)"),
    0x46A6: _integrated("Iris Xe (Alder Lake-P)"),
    0x4626: _integrated("Iris Xe (Alder Lake-P)"),
    0xA780: _integrated("UHD Graphics 770 (Raptor Lake-S)"),
    0xA7A0: _integrated("Iris Xe (Raptor Lake-P)"),
    0x7D55: _integrated("Arc Graphics (Meteor Lake)"),
    0x7D45: _integrated("Graphics (Meteor Lake)"),
    0x7D67: _integrated("Graphics (Arrow Lake-S)"),
    0x64A0: _integrated("Arc Graphics 140V (Lunar Lake)", "xe"),
    0xB080: _integrated("Arc B390 (Panther Lake)", "xe"),
    0xB082: _integrated("Arc B390 (Panther Lake)", "xe"),
    0xB084: _integrated("Arc B390 (Panther Lake)", "xe"),
    0xB086: _integrated("Arc B390 (Panther Lake)", "xe"),
    0xB081: _integrated("Arc B370 (Panther Lake)", "xe"),
    0xB083: _integrated("Arc B370 (Panther Lake)", "xe"),
    0xB085: _integrated("Arc B370 (Panther Lake)", "xe"),
    0xB087: _integrated("Arc B370 (Panther Lake)", "xe"),
}


def normalize_device_id(text: str) -> int:
    """The numeric device ID from sysfs text (``"0x56c0"``, ``"56c0"``); ValueError if not hex."""
    value = text.strip().lower()
    if value.startswith("0x"):
        value = value[2:]
    if not value or len(value) > 4:
        msg = f"{text!r} is not a 16-bit hexadecimal PCI ID"
        raise ValueError(msg)
    return int(value, 16)


def lookup(device_id: int) -> ModelInfo:
    """Model information for a PCI device ID; :data:`UNKNOWN` when the table lacks it."""
    return _TABLE.get(device_id, UNKNOWN)

"""dra-core: a framework for Kubernetes Dynamic Resource Allocation drivers.

This module is the public facade for backend authors: the hook marker, the model, the
errors and the logger (loguru's, loaded when first used: `dra_core.lazylog`). Everything a
backend needs is importable from here; the rest of the package is the core's own business.
"""

from __future__ import annotations

from dra_core._version import __version__
from dra_core.errors import (
    AllocationError,
    ClaimError,
    FatalError,
    PrepareError,
    TransientError,
)
from dra_core.fileio import (
    BoundedReadError,
    FileTooLargeError,
    NotARegularFileError,
    read_regular_file,
    read_regular_text,
)
from dra_core.hookspecs import BackendOption, CheckStatus, DoctorCheck, NodeContext, hookimpl
from dra_core.lazylog import logger
from dra_core.model import (
    LIMITS,
    AllocatedClaim,
    AllocatedDevice,
    AttributeValue,
    BackendIdentity,
    Capacity,
    ClaimRef,
    ContainerEdits,
    CounterConsumption,
    CounterSet,
    Device,
    DeviceClassSpec,
    DeviceHealth,
    DeviceNode,
    Inventory,
    ModelError,
    Mount,
    PreparedClaim,
    PreparedClaims,
    PreparedDevice,
    RequestPolicy,
    Taint,
    ValidRange,
    Version,
    validate_inventory,
)
from dra_core.quantity import QuantityError, format_bytes, parse_quantity
from dra_core.validation import describe_validation_error

__all__ = (
    "LIMITS",
    "AllocatedClaim",
    "AllocatedDevice",
    "AllocationError",
    "AttributeValue",
    "BackendIdentity",
    "BackendOption",
    "BoundedReadError",
    "Capacity",
    "CheckStatus",
    "ClaimError",
    "ClaimRef",
    "ContainerEdits",
    "CounterConsumption",
    "CounterSet",
    "Device",
    "DeviceClassSpec",
    "DeviceHealth",
    "DeviceNode",
    "DoctorCheck",
    "FatalError",
    "FileTooLargeError",
    "Inventory",
    "ModelError",
    "Mount",
    "NodeContext",
    "NotARegularFileError",
    "PrepareError",
    "PreparedClaim",
    "PreparedClaims",
    "PreparedDevice",
    "QuantityError",
    "RequestPolicy",
    "Taint",
    "TransientError",
    "ValidRange",
    "Version",
    "__version__",
    "describe_validation_error",
    "format_bytes",
    "hookimpl",
    "logger",
    "parse_quantity",
    "read_regular_file",
    "read_regular_text",
    "validate_inventory",
)

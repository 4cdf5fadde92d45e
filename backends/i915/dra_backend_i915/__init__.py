"""dra-backend-i915: a dra-core backend for Intel GPUs driven by the i915 or xe kernel driver.

It publishes whole GPUs, SR-IOV virtual functions created on demand from per-model profiles,
and GPUs shared through consumable capacity. The hooks live in :mod:`dra_backend_i915.plugin`
(entry point ``i915`` in the group ``dra_core.backends``); :mod:`dra_backend_i915.testing`
builds fake sysfs trees that behave like the kernel.
"""

from __future__ import annotations

__all__ = ("CDI_CLASS", "CDI_VENDOR", "DRIVER_NAME", "__version__")

__version__ = "0.1.0"

#: The default DRA driver name, and the domain of unqualified attribute names.
DRIVER_NAME = "gpu.intel.com"
#: CDI vendor and class of the specs: devices are ``intel.com/gpu=<claim>-<device>``.
CDI_VENDOR = "intel.com"
CDI_CLASS = "gpu"

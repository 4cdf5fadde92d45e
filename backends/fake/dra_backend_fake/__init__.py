"""dra-backend-fake: a dra-core backend with no hardware, for CI and kind clusters.

Devices come from configuration (an inventory YAML file, a device count, or a built-in
default); a control file changes the inventory and health and injects failures while the
agent runs. See ``backends/fake/README.md``.
"""

from __future__ import annotations

from typing import Final

__all__ = ("CDI_CLASS", "CDI_VENDOR", "DRIVER_NAME", "__version__")

__version__ = "0.1.0"

#: The default driver name: a lower-case DNS subdomain of at most 63 characters, also the
#: domain of the backend's unqualified attributes.
DRIVER_NAME: Final = "fake.dra-core.dev"
#: CDI devices are ``dra-core.dev/fake=<name>``.
CDI_VENDOR: Final = "dra-core.dev"
CDI_CLASS: Final = "fake"

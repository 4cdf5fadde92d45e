"""A dra-core backend for a widget that needs no driver: two devices, an env variable each."""

from collections.abc import Sequence

from dra_core import (
    AllocatedClaim,
    BackendIdentity,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    Inventory,
    NodeContext,
    PreparedClaim,
    PreparedDevice,
    hookimpl,
)


class WidgetBackend:
    """The core creates one instance per agent (the entry point names the class)."""

    @hookimpl
    def dra_backend_identity(self) -> BackendIdentity:
        return BackendIdentity(
            driver_name="widget.example.com", cdi_vendor="example.com", cdi_class="widget"
        )

    @hookimpl
    def dra_discover(self, context: NodeContext) -> Inventory:
        return Inventory(devices=(Device("widget-0"), Device("widget-1")))

    @hookimpl
    def dra_device_classes(self, identity: BackendIdentity) -> Sequence[DeviceClassSpec]:
        driver = identity.driver_name
        return [DeviceClassSpec(driver, (f'device.driver == "{driver}"',))]

    @hookimpl
    def dra_prepare(self, claim: AllocatedClaim, context: NodeContext) -> list[PreparedDevice]:
        return [PreparedDevice(d, ContainerEdits(env={"WIDGET": d.device})) for d in claim.devices]

    @hookimpl
    def dra_unprepare(self, claim: PreparedClaim, context: NodeContext) -> bool:
        return True

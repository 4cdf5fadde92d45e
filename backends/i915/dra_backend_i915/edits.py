"""Container edits for a prepared GPU, VF or share: DRM device nodes and environment.

Per device:

- device nodes ``/dev/dri/cardN`` and ``/dev/dri/renderDM`` (each when the function has it),
  with host paths under the devfs root (``--devfs-root``, default ``/dev``);
- the udev links ``/dev/dri/by-path/pci-<address>-card`` and ``-render`` when the host has
  them, as CDI device nodes whose host path is the link: the runtime stats the host path
  (following the link) and creates a real node at the by-path name in the container, which is
  what libraries that look GPUs up by PCI address (Level Zero, VA-API) open;
- ``DRI_RENDER_NODE=/dev/dri/renderDM`` (``DRI_CARD_NODE`` for the card), and the same
  suffixed with the PCI address (``DRI_RENDER_NODE_0000_03_00_0``) so a container with several
  GPUs can tell them apart (the unsuffixed one is then one of them);
- for a share of a shared GPU: ``GPU_SHARE_MEMORY_BYTES`` and ``GPU_SHARE_MILLICORES`` with
  what the scheduler reserved for this share. Nothing enforces them: the workload is expected
  to honour them (e.g. pass them to its runtime's memory and thread limits).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dra_core import ContainerEdits, DeviceNode, QuantityError, parse_quantity

__all__ = ("drm_edits",)


def _suffix(address: str) -> str:
    return address.replace(":", "_").replace(".", "_")


def drm_edits(
    address: str,
    card: str | None,
    render: str | None,
    devfs_root: Path,
    consumed: Mapping[str, str] | None = None,
) -> ContainerEdits:
    """The edits for the PCI function at ``address`` with these DRM nodes."""
    nodes: list[DeviceNode] = []
    env: dict[str, str] = {}
    dri = devfs_root / "dri"
    for node, variable in ((card, "DRI_CARD_NODE"), (render, "DRI_RENDER_NODE")):
        if node is None:
            continue
        path = f"/dev/dri/{node}"
        nodes.append(DeviceNode(path=path, host_path=str(dri / node)))
        env[variable] = path
        env[f"{variable}_{_suffix(address)}"] = path
    for kind in ("card", "render"):
        link = dri / "by-path" / f"pci-{address}-{kind}"
        if link.is_symlink() or link.exists():
            nodes.append(
                DeviceNode(path=f"/dev/dri/by-path/pci-{address}-{kind}", host_path=str(link))
            )
    for name, variable in (
        ("memory", "GPU_SHARE_MEMORY_BYTES"),
        ("millicores", "GPU_SHARE_MILLICORES"),
    ):
        value = (consumed or {}).get(name)
        if value is None:
            continue
        try:
            env[variable] = str(int(parse_quantity(value)))
        except QuantityError:
            env[variable] = value
    return ContainerEdits(env=env, device_nodes=tuple(nodes))

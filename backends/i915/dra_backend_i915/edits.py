"""Container edits for a prepared GPU, VF or share: DRM device nodes and environment.

Per device:

- device nodes ``/dev/dri/cardN`` and ``/dev/dri/renderDM`` (each when the function has it),
  with host paths under the devfs root (``--devfs-root``, default ``/dev``);
- the udev links ``/dev/dri/by-path/pci-<address>-card`` and ``-render`` when the host has
  them, as device nodes at the by-path name in the container whose host path is the node the
  link points at (``<devfs>/dri/cardN``), never the link itself: the CDI library of
  containerd and CRI-O runs ``lstat`` on the host path and refuses a symlink. Libraries that
  look GPUs up by PCI address (Level Zero, VA-API) open the by-path name. A link that points
  outside ``<devfs>/dri``, at a node that does not exist or at another node than the
  function's own is left out, with a warning naming the GPU and the link;
- ``DRI_RENDER_NODE=/dev/dri/renderDM`` (``DRI_CARD_NODE`` for the card), and the same
  suffixed with the PCI address (``DRI_RENDER_NODE_0000_03_00_0``) so a container with several
  GPUs can tell them apart (the unsuffixed one is then one of them);
- for a share of a shared GPU: ``GPU_SHARE_MEMORY_BYTES`` and ``GPU_SHARE_MILLICORES`` with
  what the scheduler reserved for this share. Nothing enforces them: the workload is expected
  to honour them (e.g. pass them to its runtime's memory and thread limits).

For admin access (monitoring) :func:`mei_edits` adds the GPU's management engine node
``/dev/meiN`` (host path under the devfs root) and ``MEI_NODE_<address>=/dev/meiN``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from dra_core import ContainerEdits, DeviceNode, QuantityError, logger, parse_quantity

__all__ = ("drm_edits", "mei_edits")


def _suffix(address: str) -> str:
    return address.replace(":", "_").replace(".", "_")


def _device_node(container_path: str, host: Path) -> DeviceNode:
    """A device node at ``container_path`` made from the host node ``host``.

    The runtime needs the node's type and major:minor to create it in the container and to
    allow it in the device cgroup. The CDI library reads them with ``lstat`` on the host path
    unless the spec gives type and major; they are given here when ``host`` is a character
    device, so the spec says which device it grants (the numbers the kernel gave, the ones
    ``drm/<node>/dev`` shows) and does not depend on the runtime seeing the same devfs. A node
    that is not a character device (a fake tree's plain file) gets only the host path.
    """
    try:
        info = os.lstat(host)
    except OSError:
        info = None
    if info is None or not stat.S_ISCHR(info.st_mode):
        return DeviceNode(path=container_path, host_path=str(host))
    return DeviceNode(
        path=container_path,
        host_path=str(host),
        type="c",
        major=os.major(info.st_rdev),
        minor=os.minor(info.st_rdev),
    )


def _by_path_target(address: str, link: Path, dri: Path, expected: str | None) -> Path | None:
    """The node the udev link ``link`` points at, or None when there is no usable one.

    ``expected`` is the function's own node (from sysfs). A missing link is None quietly (the
    host has no udev by-path links); an unusable one is None with a warning.
    """
    try:
        target = link.readlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem = "is not a symlink" if exc.errno == errno.EINVAL else f"cannot be read: {exc}"
        logger.bind(device=address).warning(
            "GPU {}: udev link {} {}; not giving it to the container", address, link, problem
        )
        return None
    devfs = dri.parent
    if target.is_absolute():
        # udev writes relative links; an absolute one names a host path under /dev, which
        # the agent sees under the devfs root.
        absolute = Path(os.path.normpath(target))
        if not absolute.is_relative_to(devfs) and absolute.is_relative_to("/dev"):
            absolute = devfs / absolute.relative_to("/dev")
    else:
        absolute = Path(os.path.normpath(link.parent / target))
    if absolute.parent != dri:
        logger.bind(device=address).warning(
            "GPU {}: udev link {} points at {}, outside {}; not giving it to the container",
            address,
            link,
            target,
            dri,
        )
        return None
    if absolute.name != expected:
        own = f"its node {expected}" if expected else "no node of that kind in sysfs"
        logger.bind(device=address).warning(
            "GPU {}: udev link {} points at {}, but the GPU has {}; not giving it to the container",
            address,
            link,
            target,
            own,
        )
        return None
    try:
        info = os.lstat(absolute)
    except OSError as exc:
        problem = (
            "which does not exist"
            if isinstance(exc, FileNotFoundError)
            else f"which cannot be examined: {exc.strerror}"
        )
        logger.bind(device=address).warning(
            "GPU {}: udev link {} points at {}, {}; not giving it to the container",
            address,
            link,
            absolute,
            problem,
        )
        return None
    if stat.S_ISLNK(info.st_mode) or stat.S_ISDIR(info.st_mode):
        logger.bind(device=address).warning(
            "GPU {}: udev link {} points at {}, which is not a device node; not giving it to "
            "the container",
            address,
            link,
            absolute,
        )
        return None
    return absolute


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
    dri = Path(os.path.normpath(devfs_root)) / "dri"
    for node, variable in ((card, "DRI_CARD_NODE"), (render, "DRI_RENDER_NODE")):
        if node is None:
            continue
        path = f"/dev/dri/{node}"
        nodes.append(_device_node(path, dri / node))
        env[variable] = path
        env[f"{variable}_{_suffix(address)}"] = path
    for kind, own in (("card", card), ("render", render)):
        name = f"pci-{address}-{kind}"
        target = _by_path_target(address, dri / "by-path" / name, dri, own)
        if target is not None:
            nodes.append(_device_node(f"/dev/dri/by-path/{name}", target))
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


def mei_edits(address: str, mei: str | None, devfs_root: Path) -> ContainerEdits:
    """The management engine node of the GPU at ``address`` (``mei0`` -> ``/dev/mei0``).

    Nothing when the GPU has none, or when its node is missing from the devfs root (a
    container runtime refuses a host path that is not there): that is logged with the GPU.
    """
    if mei is None:
        return ContainerEdits()
    host = Path(os.path.normpath(devfs_root)) / mei
    if not os.path.lexists(host):
        logger.bind(device=address).warning(
            "GPU {}: its management engine {} has no device node {}; not giving it to the "
            "container (is udev running, and the devfs root right?)",
            address,
            mei,
            host,
        )
        return ContainerEdits()
    path = f"/dev/{mei}"
    return ContainerEdits(
        env={f"MEI_NODE_{_suffix(address)}": path}, device_nodes=(_device_node(path, host),)
    )

"""Creating and removing SR-IOV VFs on a PF, in the order the kernel requires.

Creation (at the prepare of a PF's first VF):

1. ``sriov_numvfs`` must read 0 (the PCI core refuses to change a non-zero count: ``EBUSY``).
2. Quotas, per VF and per GT, in this order: ``exec_quantum_ms``, ``preempt_timeout_us``,
   ``lmem_quota``, ``ggtt_quota``, ``doorbells_quota``, ``contexts_quota`` (i915
   ``<card>/prelim_iov/vfK/<gt>/``; files the GT lacks are skipped). On two-tile GPUs (Max
   1550/1450: ``gt0`` and ``gt1``) ``ggtt_quota`` and ``doorbells_quota`` are divided by the
   number of tiles, as Intel's driver does, and ``lmem_quota`` (a per-tile figure) is written
   whole to each tile. On xe,
   ``sriov_admin/vfK/profile/{exec_quantum_ms,preempt_timeout_us,vram_quota}`` when the kernel
   has ``sriov_admin`` (6.19+), else the kernel's fair-share auto-provisioning is used.
3. ``sriov_drivers_autoprobe`` = 1 (VFs bind to i915/xe and get DRM nodes), then
   ``sriov_numvfs`` = N.
4. A bounded wait (poll) for every ``virtfnK`` link and its DRM card node.

On any failure the PF is rolled back (``sriov_numvfs`` = 0, quotas back to 0,
``auto_provisioning`` = 1) and :class:`dra_core.PrepareError` says what failed.

Teardown (when the last backend-created VF is released) writes 0 to ``sriov_numvfs``, waits
for the VFs to go, and resets the quotas the same way.

All writes go through a :class:`~dra_backend_i915.sysfs.SysfsWriter`, the seam the fake
kernel of :mod:`dra_backend_i915.testing` replaces.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from dra_backend_i915.discovery import Gpu
from dra_backend_i915.inventory import detect_ecc
from dra_backend_i915.profiles import Profile
from dra_backend_i915.sysfs import SysfsError, SysfsWriter, read_int, read_str
from dra_core import PrepareError, logger

__all__ = ("I915_QUOTA_ORDER", "VfProvisioner", "quota_writes")

I915_QUOTA_ORDER = (
    "exec_quantum_ms",
    "preempt_timeout_us",
    "lmem_quota",
    "ggtt_quota",
    "doorbells_quota",
    "contexts_quota",
)
XE_PROFILE_ORDER = ("exec_quantum_ms", "preempt_timeout_us", "vram_quota")


def _iov_dir(pf: Gpu) -> Path | None:
    if pf.card is None:
        return None
    card = pf.path / "drm" / pf.card
    for name in ("prelim_iov", "iov"):
        if (card / name).is_dir():
            return card / name
    return None


def _i915_values(profile: Profile, ecc: bool) -> dict[str, int]:
    return {
        "exec_quantum_ms": profile.exec_quantum_ms,
        "preempt_timeout_us": profile.preempt_timeout_us,
        "lmem_quota": profile.lmem_bytes_ecc if ecc else profile.lmem_bytes,
        "ggtt_quota": profile.ggtt,
        "doorbells_quota": profile.doorbells,
        "contexts_quota": profile.contexts,
    }


#: The i915 VF quotas that are per-VF figures, divided by the number of tiles on each tile.
I915_SPLIT_OVER_TILES = ("ggtt_quota", "doorbells_quota")


def _per_tile(values: dict[str, int], tiles: int) -> dict[str, int]:
    """The values to write on each of ``tiles`` tiles, as Intel's driver divides them."""
    if tiles <= 1:
        return values
    return {
        name: value // tiles if name in I915_SPLIT_OVER_TILES else value
        for name, value in values.items()
    }


def quota_writes(pf: Gpu, profile: Profile) -> list[tuple[Path, int]]:
    """The quota files to write for ``profile`` on ``pf``, in order, with their values."""
    writes: list[tuple[Path, int]] = []
    ecc = detect_ecc(pf, profile.key)
    if pf.driver == "i915":
        iov = _iov_dir(pf)
        if iov is None:
            logger.warning("{} has no prelim_iov tree; relying on auto-provisioning", pf.address)
            return writes
        values = _i915_values(profile, ecc)
        for vf in range(1, profile.num_vfs + 1):
            gts = sorted(p for p in (iov / f"vf{vf}").glob("gt*") if p.is_dir())
            # Doorbells and GGTT are per-VF figures split over the tiles (each tile has its
            # own 240 doorbells and GGTT); lmem_quota is already a per-tile figure.
            per_tile = _per_tile(values, len(gts))
            for gt in gts:
                writes.extend(
                    (gt / name, per_tile[name]) for name in I915_QUOTA_ORDER if (gt / name).exists()
                )
    elif pf.driver == "xe":
        admin = pf.path / "sriov_admin"
        if not admin.is_dir():
            logger.info("{} has no sriov_admin (kernel < 6.19); xe auto-provisions", pf.address)
            return writes
        values = {
            "exec_quantum_ms": profile.exec_quantum_ms,
            "preempt_timeout_us": profile.preempt_timeout_us,
            "vram_quota": profile.lmem_bytes_ecc if ecc else profile.lmem_bytes,
        }
        for vf in range(1, profile.num_vfs + 1):
            folder = admin / f"vf{vf}" / "profile"
            writes.extend(
                (folder / name, values[name])
                for name in XE_PROFILE_ORDER
                if (folder / name).exists()
            )
    return writes


class VfProvisioner:
    """Creates and removes a PF's VFs through a writer, waiting at most ``timeout`` seconds."""

    def __init__(self, writer: SysfsWriter, *, timeout: float = 10.0, poll: float = 0.05) -> None:
        self.writer = writer
        self.timeout = timeout
        self.poll = poll

    def create(self, pf: Gpu, profile: Profile) -> list[str]:
        """Create ``profile.num_vfs`` VFs on ``pf``; their addresses in virtfn order.

        Raises :class:`dra_core.PrepareError` after rolling back.
        """
        numvfs = pf.path / "sriov_numvfs"
        try:
            current = read_int(numvfs)
        except SysfsError as exc:
            msg = f"cannot create VFs on {pf.address}: {exc}"
            raise PrepareError(msg) from None
        if current != 0:
            msg = (
                f"cannot create VFs on {pf.address}: sriov_numvfs is already {current} "
                f"(VFs made outside this driver?); write 0 to {numvfs} once they are unused"
            )
            raise PrepareError(msg)
        writes = quota_writes(pf, profile)
        step = "writing the VF quotas"
        try:
            for path, value in writes:
                self.writer.write(path, str(value))
            autoprobe = pf.path / "sriov_drivers_autoprobe"
            if autoprobe.exists():
                step = f"writing 1 to {autoprobe}"
                self.writer.write(autoprobe, "1")
            step = f"writing {profile.num_vfs} to {numvfs}"
            self.writer.write(numvfs, str(profile.num_vfs))
            step = "waiting for the VFs to appear"
            addresses = self._wait_created(pf, profile.num_vfs)
        except (OSError, SysfsError, TimeoutError) as exc:
            reason = _reason(exc)
            left = self._rollback(pf, writes)
            outcome = (
                "rolled back to 0 VFs, the kubelet will retry"
                if not left
                else f"the rollback could not remove the VFs ({left}): they are removed once no "
                f"claim uses them, or write 0 to {numvfs} by hand"
            )
            msg = (
                f"creating {profile.num_vfs} VFs ({profile.name}) on {pf.address} failed while "
                f"{step}: {reason}; {outcome}"
            )
            raise PrepareError(msg) from exc
        logger.bind(device=pf.name).info(
            "created {} VFs ({}) on {}", profile.num_vfs, profile.name, pf.address
        )
        return addresses

    def teardown(self, pf: Gpu) -> None:
        """Remove the PF's VFs and reset the quotas; OSError/TimeoutError if the kernel refuses."""
        self.writer.write(pf.path / "sriov_numvfs", "0")
        self._wait_gone(pf)
        self._reset_quotas(pf)
        logger.bind(device=pf.name).info("removed the VFs of {}", pf.address)

    def wait_created(self, pf: Gpu, count: int) -> list[str]:
        """Wait (bounded) for ``count`` VFs of ``pf`` with their DRM cards; their addresses.

        For VFs whose ``sriov_numvfs`` write is done (e.g. by an agent that stopped before
        recording them as made). ``TimeoutError`` when they do not all appear in time.
        """
        return self._wait_created(pf, count)

    # -- internals -----------------------------------------------------------------------------

    def _wait_created(self, pf: Gpu, count: int) -> list[str]:
        deadline = time.monotonic() + self.timeout
        while True:
            ready = []
            for index in range(count):
                link = pf.path / f"virtfn{index}"
                if not link.exists():
                    break
                drm = link.resolve() / "drm"
                if not any(drm.glob("card*")):
                    break
                ready.append(link.resolve().name)
            if len(ready) == count:
                return ready
            if time.monotonic() >= deadline:
                msg = (
                    f"only {len(ready)} of {count} VFs (with DRM nodes) appeared within "
                    f"{self.timeout:g} s"
                )
                raise TimeoutError(msg)
            time.sleep(self.poll)

    def _wait_gone(self, pf: Gpu) -> None:
        deadline = time.monotonic() + self.timeout
        while any(pf.path.glob("virtfn*")):
            if time.monotonic() >= deadline:
                msg = f"the VFs of {pf.address} were still there {self.timeout:g} s after removal"
                raise TimeoutError(msg)
            time.sleep(self.poll)

    def _rollback(self, pf: Gpu, writes: list[tuple[Path, int]]) -> str:
        """Back to 0 VFs and zero quotas; why the VFs could not be removed, or ""."""
        left = ""
        try:
            self.writer.write(pf.path / "sriov_numvfs", "0")
            self._wait_gone(pf)
        except (OSError, TimeoutError) as exc:
            left = _reason(exc)
            logger.bind(device=pf.name).error(
                "rollback of {}: writing 0 to sriov_numvfs failed: {}", pf.address, left
            )
        for path, _ in reversed(writes):
            self._zero(path)
        self._reset_quotas(pf)
        return left

    def _reset_quotas(self, pf: Gpu) -> None:
        """Zero every VF quota, then give the PF back to auto-provisioning."""
        if pf.driver == "i915":
            iov = _iov_dir(pf)
            if iov is None:
                return
            auto = iov / "pf" / "auto_provisioning"
            try:
                if auto.exists() and read_str(auto) == "1":
                    return
            except SysfsError:
                pass
            for vf in sorted(iov.glob("vf[0-9]*")):
                for gt in sorted(p for p in vf.glob("gt*") if p.is_dir()):
                    for name in I915_QUOTA_ORDER:
                        if (gt / name).exists():
                            self._zero(gt / name)
            if auto.exists():
                try:
                    self.writer.write(auto, "1")
                except OSError as exc:
                    logger.bind(device=pf.name).warning(
                        "{}: cannot re-enable auto-provisioning: {}", auto, _reason(exc)
                    )
        elif pf.driver == "xe":
            for path in sorted((pf.path / "sriov_admin").glob("vf[0-9]*/profile/vram_quota")):
                self._zero(path)

    def _zero(self, path: Path) -> None:
        try:
            if read_str(path) not in ("0", ""):
                self.writer.write(path, "0")
        except (OSError, SysfsError) as exc:
            logger.warning("{}: cannot reset to 0: {}", path, _reason(exc))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        hint = {
            errno.EBUSY: "VFs exist already (write 0 first)",
            errno.ERANGE: "more VFs than sriov_totalvfs",
            errno.ENOENT: "PF not bound to a driver with SR-IOV support",
            errno.ENOKEY: "VF configurations partly filled",
            errno.EDQUOT: "quota over the available maximum",
        }.get(exc.errno, exc.strerror or "")
        return f"{name} ({hint}) on {exc.filename}" if exc.filename else f"{name} ({hint})"
    return str(exc)

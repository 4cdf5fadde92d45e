"""Exceptions a backend raises to tell the core what went wrong, and what happens next."""

from __future__ import annotations

__all__ = ("AllocationError", "PrepareError")


class AllocationError(Exception):
    """The node refuses an allocation (device missing, unhealthy, busy, partition impossible).

    Raised from ``dra_check_allocation``; the claim fails to prepare with this message and
    nothing has been changed. The kubelet retries, so a transient reason may clear.
    """


class PrepareError(Exception):
    """Making a device usable failed; the claim's prepare fails with this message.

    Raised from ``dra_prepare``; the core undoes partial work through ``dra_unprepare``.
    """

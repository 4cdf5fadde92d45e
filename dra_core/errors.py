"""Errors sorted by what happens next: this claim fails, retry later, or the agent must stop.

A backend raises them from its hooks, and the core raises them too; the core acts on each
kind the same way wherever it comes from, one claim at a time, so that one claim's failure
never fails the other claims of a kubelet call:

- :class:`ClaimError` (with :class:`AllocationError` and :class:`PrepareError`): this claim
  fails with the message, in the kubelet's answer, the claim's events and the log (WARNING,
  without a traceback); what was done for it is undone, and the kubelet calls again later.
- :class:`TransientError`: the same, for a condition expected to clear by itself (a device
  resetting, a busy lock, an API server that does not answer); the message ends with "the
  kubelet will retry".
- :class:`FatalError`: the agent must stop; it answers the claim with the message, stops
  serving and exits with a non-zero status, so that its DaemonSet restarts it.

Any other exception raised by a backend is a bug in it: the claim fails with a message that
says so, and the traceback is logged at ERROR for the backend's authors.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = (
    "RETRY_NOTE",
    "AllocationError",
    "ClaimError",
    "Consequence",
    "FatalError",
    "PrepareError",
    "TransientError",
    "consequence",
)

#: What a transient failure's message ends with.
RETRY_NOTE: Final = "the kubelet will retry"

#: What happens next: ``claim`` this claim fails, ``retry`` it fails this time only, ``stop``
#: the agent must stop, ``bug`` an unexpected error (this claim fails, with its traceback
#: logged).
Consequence = Literal["claim", "retry", "stop", "bug"]


class ClaimError(Exception):
    """This claim fails with this message; the other claims go on.

    The message reaches the user (the kubelet's answer, the pod's events): name the device
    and say what to do. The core undoes what was done for the claim; the kubelet calls again.
    """


class AllocationError(ClaimError):
    """The node refuses an allocation (device missing, unhealthy, busy, partition impossible).

    Raised from ``dra_check_allocation``; the claim fails to prepare with this message and
    nothing has been changed. The kubelet retries, so a reason that passes may clear.
    """


class PrepareError(ClaimError):
    """Making a device usable failed; the claim's prepare fails with this message.

    Raised from ``dra_prepare``; the core undoes partial work through ``dra_unprepare``.
    """


class TransientError(Exception):
    """Retry later: this claim fails this time, and the kubelet calls again.

    For a condition expected to clear by itself (a device resetting, a firmware update in
    progress); logged at WARNING without a traceback.
    """


class FatalError(Exception):
    """The agent must stop: no claim can be served on this node as it stands.

    For a broken node (the kernel driver unloaded, the backend's state lost beyond repair):
    the claim fails with this message, the agent stops serving and exits with a non-zero
    status and this message; its DaemonSet restarts it. Say what the operator must fix.
    """


def consequence(error: BaseException) -> Consequence:
    """What happens next after ``error``: its kind, or that of the error it wraps
    (``__cause__``, as a failed hook call carries the backend's exception)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FatalError):
            return "stop"
        if isinstance(seen, TransientError):
            return "retry"
        if isinstance(seen, ClaimError):
            return "claim"
        seen = seen.__cause__
    return "bug"

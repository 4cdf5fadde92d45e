"""The boundary between the kubelet gRPC servers and the node's prepare/unprepare pipeline.

The servers in this package translate kubelet messages into `dra_core.model` values and hand
them to an object implementing `NodeService`; they know nothing about claims beyond that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from dra_core.model import ClaimRef, ClaimResult

__all__ = ["NodeService"]


@runtime_checkable
class NodeService(Protocol):
    """Prepares and unprepares claims for the kubelet.

    Both calls get every (distinct, well-formed) claim of one kubelet request and run on a
    gRPC worker thread; the kubelet gives each call 45 seconds. Both must be idempotent.
    """

    def prepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, ClaimResult]:
        """Prepare ``claims``; return a result for each claim UID.

        A claim that failed has a non-empty ``ClaimResult.error``. A UID missing from the
        result is reported to the kubelet as an error. Raising fails every claim of the call.
        ``deadline`` is the `time.monotonic` time by which the results are due (the kubelet's
        deadline less a margin for the answer; None when the call has none): work that cannot
        finish by then should fail its claims rather than make the whole call late.
        """
        ...

    def unprepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, str]:
        """Unprepare ``claims``; return claim UID -> error message ("" for success).

        Claims this node never prepared succeed. Raising fails every claim of the call.
        ``deadline`` is as for `prepare`: a claim that cannot be unprepared by then should fail
        (it stays prepared, and the kubelet retries) rather than make the whole call late.
        """
        ...

"""Retrying API calls with backoff.

Connection failures, throttling (429) and server errors (5xx) are retried with a growing
delay, honouring the server's ``Retry-After``. Everything else, conflicts (409) included, is
raised at once: a conflict means the caller's copy is stale, and only the caller can re-read
and decide again. A caller that must answer by a deadline (a kubelet call) passes it: no
wait reaches past it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dra_core.kube.client import ApiError
from dra_core.lazylog import logger

__all__ = ("Backoff", "call_with_retries")

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: ``delays[n - 1]`` after the n-th failure, then the last one.

    ``cap`` bounds every delay, a server's ``Retry-After`` included.
    """

    delays: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays) or self.cap < 0:
            msg = f"Backoff needs at least one delay and no negative ones, got {self.delays}"
            raise ValueError(msg)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1 for the first).

        A positive ``retry_after`` from the server replaces the computed delay, within ``cap``.
        """
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self.cap)
        index = min(max(failures, 1), len(self.delays)) - 1
        return min(self.delays[index], self.cap)


def call_with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = None,
    stop: threading.Event | None = None,
    backoff: Backoff | None = None,
    sleep: Callable[[float], object] | None = None,
    deadline: float | None = None,
) -> T:
    """Call ``fn`` until it returns, retrying retriable `ApiError`s.

    ``what`` names the operation in the log ("create ResourceSlice node-1-gpu-00000").
    ``attempts`` bounds the number of calls (None: no bound). When ``stop`` is set the last
    error is raised instead of waiting again. ``deadline`` (a `time.monotonic` value) bounds
    the waits: when the next delay would end at or past it, the last error is raised instead;
    ``fn`` itself must keep its request within the deadline. ``sleep`` waits between attempts
    (injected by tests); by default ``stop.wait`` or ``time.sleep``.

    Raises the first non-retriable `ApiError` (409 included) and any other exception at once,
    or the last retriable error when attempts run out, ``stop`` is set or the deadline is near.
    """
    if attempts is not None and attempts < 1:
        msg = f"attempts must be at least 1, got {attempts}"
        raise ValueError(msg)
    policy = backoff or Backoff()
    failures = 0
    while True:
        try:
            return fn()
        except ApiError as exc:
            if not exc.retriable:
                raise
            failures += 1
            if (attempts is not None and failures >= attempts) or (stop and stop.is_set()):
                logger.warning("{}: attempt #{} failed, giving up: {}", what, failures, exc)
                raise
            delay = policy.delay(failures, exc.retry_after)
            if deadline is not None and time.monotonic() + delay >= deadline:
                logger.warning(
                    "{}: attempt #{} failed, no time left for another: {}", what, failures, exc
                )
                raise
            logger.warning(
                "{}: attempt #{} failed; retrying in {:.1f} s: {}", what, failures, delay, exc
            )
            if _wait(delay, stop, sleep):
                logger.info("{}: stopping, no more retries", what)
                raise


def _wait(
    delay: float, stop: threading.Event | None, sleep: Callable[[float], object] | None
) -> bool:
    """Wait ``delay`` seconds; True when ``stop`` was set meanwhile."""
    if sleep is not None:
        sleep(delay)
    elif stop is not None:
        stop.wait(delay)
    else:
        time.sleep(delay)
    return stop is not None and stop.is_set()

"""A client-side bound on the rate of API requests: a token bucket, as client-go's QPS/burst.

The bucket holds up to ``burst`` tokens and refills at ``qps`` tokens a second; every request
takes one, waiting when the bucket is empty. A burst of ``burst`` requests goes out at once,
then they are spaced ``1 / qps`` apart. Waiters are served in arrival order (a ticket is
reserved under the lock, then waited for outside it), so a storm of prepares is paced fairly.

A caller with a deadline (a kubelet call) sets it with `waits_end_by`: a request whose turn
would come after it is not sent and raises `RateLimitTimeout`, and takes no token, so the
requests behind it are not pushed back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from dra_core.errors import TransientError

__all__ = (
    "BURST_ENV",
    "DEFAULT_BURST",
    "DEFAULT_QPS",
    "QPS_ENV",
    "RateLimitTimeout",
    "TokenBucket",
    "parse_burst",
    "parse_qps",
    "waits_end_by",
)

#: Requests a second at steady state. The kubelet's own client on the same node defaults to
#: 50 QPS / 100 burst (``kubeAPIQPS``/``kubeAPIBurst``); client-go's bare default of 5/10
#: would pace a storm of 1,000 claim reads over more than three minutes, far beyond the 45 s
#: the kubelet gives one prepare call, while 50/100 reads them in about 18 s.
DEFAULT_QPS = 50.0
#: Requests that may go out at once after a quiet period.
DEFAULT_BURST = 100
#: Environment variables overriding the client-side request rate (requests a second, and the
#: burst); a QPS of 0 disables the limit.
QPS_ENV = "DRA_KUBE_API_QPS"
BURST_ENV = "DRA_KUBE_API_BURST"

#: The time (on the buckets' clock) by which a request of this context must have its token.
_WAIT_DEADLINE: ContextVar[float | None] = ContextVar("dra_rate_limit_deadline", default=None)


class RateLimitTimeout(TransientError):
    """A request's turn under the rate limit would come after its caller's deadline: the
    request was not sent. The message says how long it would have waited and what was left."""

    def __init__(self, bucket: TokenBucket, wait: float, left: float) -> None:
        self.wait = wait
        self.left = left
        super().__init__(
            f"the agent's rate limit on API requests ({bucket.qps:g} a second, bursts of "
            f"{bucket.burst}; --kube-api-qps, --kube-api-burst) did not allow the request in "
            f"time: its turn would come in {wait:.1f} s, {max(0.0, left):.1f} s were left"
        )


@contextmanager
def waits_end_by(deadline: float) -> Iterator[None]:
    """Within the block, requests of this thread whose token would come after ``deadline``
    (a `time.monotonic` value) raise `RateLimitTimeout` instead of waiting for it."""
    reset = _WAIT_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _WAIT_DEADLINE.reset(reset)


def seconds_left() -> float | None:
    """Seconds until the deadline set by `waits_end_by` for this thread, if one is set."""
    deadline = _WAIT_DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def parse_qps(text: str) -> float:
    """A request rate as given on the command line or in the environment: requests a second,
    a finite number of 0 or more (0 disables the limit). ``ValueError`` says what is wrong."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        msg = f"{text!r} is not a number of requests a second (0 or more; 0 disables the limit)"
        raise ValueError(msg)
    return value


def parse_burst(text: str) -> int:
    """A burst as given on the command line or in the environment: a whole number of requests,
    0 or more (at least 1 when a rate is set). ``ValueError`` says what is wrong."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()) or len(stripped) > 9:
        msg = f"{text!r} is not a whole number of requests (0 to 999999999)"
        raise ValueError(msg)
    return int(stripped)


class TokenBucket:
    """Blocks `acquire` callers so that at most ``burst + qps * t`` requests start in t s.

    ``qps`` <= 0 disables the limit. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if qps > 0 and burst < 1:
            msg = f"burst must be at least 1 when qps is set, got {burst}"
            raise ValueError(msg)
        self.qps = float(qps)
        self.burst = int(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()
        #: Seconds callers have waited in total (for tests and reports).
        self.waited = 0.0

    @property
    def enabled(self) -> bool:
        return self.qps > 0

    def reserve(self, deadline: float | None = None) -> float:
        """Take one token now and return the seconds to wait before using it (0: none).

        :raises RateLimitTimeout: the wait would end after ``deadline`` (on the bucket's
            clock); no token is taken.
        """
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self._clock()
            tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps) - 1.0
            # A negative balance is a queue of reservations, each 1 / qps after the previous.
            wait = 0.0 if tokens >= 0 else -tokens / self.qps
            if deadline is not None and now + wait > deadline:
                raise RateLimitTimeout(self, wait, deadline - now)
            self._tokens = tokens
            self._last = now
            self.waited += wait
            return wait

    def acquire(self) -> float:
        """Wait for one token; return the seconds waited.

        :raises RateLimitTimeout: within `waits_end_by`, the token would come after its deadline.
        """
        wait = self.reserve(_WAIT_DEADLINE.get())
        if wait > 0:
            self._sleep(wait)
        return wait

    def __repr__(self) -> str:
        return f"TokenBucket(qps={self.qps}, burst={self.burst})"

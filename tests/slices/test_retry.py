"""Unit tests of API retries with a fake clock."""

from __future__ import annotations

import threading

import pytest

from dra_core.kube.client import ApiError
from dra_core.kube.retry import Backoff, call_with_retries


class FakeClock:
    def __init__(self, stop: threading.Event | None = None, stop_after: int | None = None):
        self.sleeps: list[float] = []
        self.stop = stop
        self.stop_after = stop_after

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.stop is not None and self.stop_after == len(self.sleeps):
            self.stop.set()


def failing(errors: list[Exception], result: str = "ok"):
    calls = []

    def fn() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def err(status: int, retry_after: float | None = None) -> ApiError:
    return ApiError("GET", "/x", status, "boom", retry_after)


def test_retries_retriable_errors_with_backoff():
    clock = FakeClock()
    fn = failing([err(0), err(500), err(503), err(429)])
    assert call_with_retries(fn, what="get x", sleep=clock) == "ok"
    assert clock.sleeps == [0.2, 0.5, 1.0, 2.0]


def test_delays_stay_at_the_last_and_cap():
    backoff = Backoff(delays=(1.0, 50.0), cap=20.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 9)] == [1.0, 20.0, 20.0, 20.0]


def test_retry_after_honoured_and_capped():
    clock = FakeClock()
    fn = failing([err(429, retry_after=7), err(503, retry_after=1000)])
    call_with_retries(fn, what="x", sleep=clock, backoff=Backoff(cap=30))
    assert clock.sleeps == [7, 30]


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_non_retriable_raised_at_once(status):
    clock = FakeClock()
    fn = failing([err(status)])
    with pytest.raises(ApiError) as info:
        call_with_retries(fn, what="x", sleep=clock)
    assert info.value.status == status
    assert clock.sleeps == []
    assert len(fn.calls) == 1


def test_other_exceptions_propagate():
    fn = failing([RuntimeError("bug")])
    with pytest.raises(RuntimeError):
        call_with_retries(fn, what="x", sleep=FakeClock())


def test_attempts_bound():
    clock = FakeClock()
    fn = failing([err(500)] * 10)
    with pytest.raises(ApiError):
        call_with_retries(fn, what="x", attempts=3, sleep=clock)
    assert len(fn.calls) == 3
    assert clock.sleeps == [0.2, 0.5]


def test_stop_event_ends_retries():
    stop = threading.Event()
    clock = FakeClock(stop, stop_after=2)
    fn = failing([err(500)] * 10)
    with pytest.raises(ApiError):
        call_with_retries(fn, what="x", stop=stop, sleep=clock)
    assert len(fn.calls) == 2


def test_stop_already_set_raises_after_first_failure():
    stop = threading.Event()
    stop.set()
    fn = failing([err(500)] * 10)
    with pytest.raises(ApiError):
        call_with_retries(fn, what="x", stop=stop)
    assert len(fn.calls) == 1


def test_default_wait_uses_stop_event():
    stop = threading.Event()
    fn = failing([err(500)], result="done")
    assert call_with_retries(fn, what="x", stop=stop, backoff=Backoff(delays=(0.01,))) == "done"


def test_logs_attempt_and_what(caplog_loguru):
    fn = failing([err(500)])
    call_with_retries(fn, what="create ResourceSlice s1", sleep=FakeClock())
    assert any(
        "create ResourceSlice s1: attempt #1 failed; retrying in 0.2 s" in m for m in caplog_loguru
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="attempts"):
        call_with_retries(lambda: 1, what="x", attempts=0)
    with pytest.raises(ValueError, match="delay"):
        Backoff(delays=())

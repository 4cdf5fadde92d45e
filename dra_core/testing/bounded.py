"""Run a call that must not block: a test of a read that could hang (a FIFO, a stuck device)
fails in bounded time instead of hanging the test run."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ("within",)


def within(seconds: float, call: Callable[[], object]) -> object:
    """``call()``'s result, or the exception it raised; an AssertionError if it is still
    running after ``seconds`` (it is left to finish in a daemon thread)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for more than {seconds} s"
    return outcome[0]

"""Backend hook calls bounded in time, and the errors of hook calls.

The calls that touch hardware or files (prepare, unprepare, check_allocation, decode_config,
discover, device_health) run under a :class:`Watchdog`: each runs in a worker thread while the
caller waits at most its limit (:class:`HookLimits`). A call that does not return in time
fails with :class:`HookTimeout` and goes on running, tracked as stuck: Python cannot stop a
thread, but the caller is free again and releases the driver lock. Until a stuck call returns,
a new call for the same claim (or of the same claim-less hook) fails at once with
:class:`HookStuck`, so one wedged device does not pile up threads; the agent's liveness check
fails once a call has been stuck longer than ``HookLimits.stuck``, so that it is restarted.

:class:`HookError`, the error of any hook call, lives here because the watchdog raises it too;
`dra_core.plugins` (the facade that calls the hooks) builds on this module. Its message says
in a user's words what failed (``backend 'acme' refused the allocation: ...``); the plugin and
hook it names are attributes, for the log and for backend authors. A timeout is a
`dra_core.errors.TransientError`: the claim fails this time, and the kubelet retries.
"""

from __future__ import annotations

import contextvars
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, Generic, TypeVar

from dra_core.errors import ClaimError, FatalError, TransientError
from dra_core.lazylog import logger
from dra_core.model import ClaimRef
from dra_core.validation import describe_validation_error

__all__ = (
    "MAX_STUCK_CALLS",
    "WATCHED_HOOKS",
    "HookError",
    "HookLimits",
    "HookStuck",
    "HookTimeout",
    "StuckCall",
    "Watchdog",
)

T = TypeVar("T")


#: What a failed call of each hook means to a user: "backend 'acme' <this>: <detail>".
_FAILED: Final = {
    "dra_backend_options": "could not list its options",
    "dra_backend_identity": "could not name its driver",
    "dra_start": "could not start",
    "dra_stop": "did not stop cleanly",
    "dra_discover": "could not discover the devices",
    "dra_device_attributes": "could not add device attributes",
    "dra_device_classes": "could not list its DeviceClasses",
    "dra_decode_config": "rejected the opaque config",
    "dra_check_allocation": "refused the allocation",
    "dra_prepare": "could not prepare the devices",
    "dra_container_edits": "could not add container edits",
    "dra_claim_edits": "could not add the claim's container edits",
    "dra_unprepare": "could not unprepare the devices",
    "dra_device_health": "could not check the devices' health",
    "dra_doctor_checks": "could not run its checks",
}
#: Exceptions whose message reads well without their type's name in front.
_SELF_EXPLAINED = (ClaimError, TransientError, FatalError, ValueError, OSError)


class HookError(Exception):
    """A hook implementation raised; the message says what failed, in a user's words.

    ``plugin`` and ``hook`` name the implementation (log fields, for backend authors),
    ``backend`` the agent's backend, ``detail`` what the exception said; ``__cause__`` is the
    exception itself.
    """

    def __init__(
        self, plugin: str, hook: str, cause: BaseException, *, backend: str | None = None
    ) -> None:
        self.plugin = plugin
        self.hook = hook
        self.backend = backend or plugin
        self.detail = describe(cause)
        actor = f"backend {plugin!r}" if plugin == self.backend else f"plugin {plugin!r}"
        super().__init__(f"{actor} {_FAILED.get(hook, 'failed')}: {self.detail}")


def describe(error: BaseException) -> str:
    """What a hook's exception says: pydantic's validation errors in plain words, and an
    unexpected exception with its type (``KeyError: 'memory'``)."""
    if type(error).__module__.startswith("pydantic") and hasattr(error, "errors"):
        return describe_validation_error(error)
    if isinstance(error, _SELF_EXPLAINED) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class HookTimeout(HookError, TransientError):
    """A watched hook call did not return within its limit; it goes on, tracked as stuck.

    ``claim`` is the claim it was called for (None for discovery and config decoding);
    ``__cause__`` is a TimeoutError whose message says how long, where it runs and what next.
    """

    def __init__(
        self, plugin: str, hook: str, detail: str, claim: ClaimRef | None, backend: str
    ) -> None:
        cause = TimeoutError(detail)
        super().__init__(plugin, hook, cause, backend=backend)
        self.__cause__ = cause
        self.claim = claim


class HookStuck(HookTimeout):
    """A hook was not called: an earlier call for the same claim (or, for a hook without a
    claim, of the same hook) has not returned, or too many calls are stuck."""


#: The hooks bounded in time, with the `HookLimits` field that bounds each.
WATCHED_HOOKS: Final = {
    "dra_prepare": "prepare",
    "dra_unprepare": "prepare",
    "dra_check_allocation": "prepare",
    "dra_decode_config": "prepare",
    "dra_discover": "discovery",
    "dra_device_health": "discovery",
}
#: A watched hook's call as a user would name it.
_CALLS: Final = {
    "dra_prepare": "prepare",
    "dra_unprepare": "unprepare",
    "dra_check_allocation": "allocation check",
    "dra_decode_config": "opaque config check",
    "dra_discover": "discovery",
    "dra_device_health": "health check",
}
#: What the core does when a watched hook does not answer in time, for the error message.
_ON_TIMEOUT: Final = {
    "dra_prepare": "the claim fails, and what the call did is undone once it returns",
    "dra_unprepare": "the claim stays prepared and the kubelet retries",
    "dra_check_allocation": "the claim fails and the kubelet retries",
    "dra_decode_config": "the claim or the admission review fails",
    "dra_discover": "the devices discovered last stay published",
    "dra_device_health": "the device health reported last stays in effect",
}
#: With this many calls stuck, every new watched call fails at once: the backend is wedged, and
#: more threads would only wait with the others until the agent is restarted.
MAX_STUCK_CALLS: Final = 16


@dataclass(frozen=True)
class HookLimits:
    """How long the core waits for a backend hook call, in seconds.

    A call that does not return within its limit fails with :class:`HookTimeout` and goes on
    running, tracked as stuck; one still running ``stuck`` seconds after it began means the
    backend is wedged, and the agent's liveness check fails so that it is restarted.
    """

    #: ``dra_prepare``, ``dra_unprepare``, ``dra_check_allocation``, ``dra_decode_config``.
    prepare: float = 60.0
    #: ``dra_discover`` (with the extension plugins' attributes) and ``dra_device_health``.
    discovery: float = 30.0
    #: Since the start of a call that timed out and still runs: the agent must be restarted.
    stuck: float = 180.0

    def __post_init__(self) -> None:
        for name in ("prepare", "discovery", "stuck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                msg = f"time limit {name!r}: {getattr(self, name)!r} is not a positive number"
                raise ValueError(msg)

    def of(self, hook: str) -> float:
        """The limit of a watched hook."""
        return float(getattr(self, WATCHED_HOOKS[hook]))


@dataclass(frozen=True)
class StuckCall:
    """A watched hook call that did not return within its limit and is still running."""

    hook: str
    #: The plugin whose implementation was running when the limit passed.
    plugin: str
    claim: ClaimRef | None
    #: ``time.monotonic()`` when the call began.
    started: float
    limit: float
    #: The innermost frames of the call when the limit passed (``file:line in function``).
    where: str

    def age(self) -> float:
        """Seconds since the call began."""
        return time.monotonic() - self.started

    def describe(self) -> str:
        """``hook 'dra_prepare' of plugin 'fake' for claim default/c (uid)``."""
        what = f"hook {self.hook!r} of plugin {self.plugin!r}"
        return what if self.claim is None else f"{what} for claim {self.claim}"


class _Outcome(Generic[T]):
    """What a watched call came to; ``done`` is set under the watchdog's lock."""

    __slots__ = ("done", "error", "thread", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        #: The ident of the thread running the call, once it runs.
        self.thread: int | None = None
        self.value: T | None = None
        self.error: BaseException | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set, since no error was


class _Workers:
    """The threads that run watched calls: idle ones wait for the next call.

    Handing a call to a waiting thread costs about 25 µs; starting a thread per call cost 200 to
    300 µs on a busy two-core machine. A thread busy with a call (stuck or not) is not waited
    for: a call finding no idle thread starts a new one. Idle threads beyond ``max_idle``, and
    those idle for ``idle_seconds``, end.
    """

    def __init__(self, *, max_idle: int = 4, idle_seconds: float = 60.0) -> None:
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._reset()

    def _reset(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Threads waiting for a call that no caller has counted on yet.
        self._idle = 0
        self._started = 0

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` in an idle thread, or in a new one when none is idle."""
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self._started += 1
                number = self._started
            else:
                self._idle -= 1  # that thread is counted on: it does not end while idle
        if spawn:
            thread = threading.Thread(
                target=self._serve,
                name=f"dra-hook-{number}",
                daemon=True,  # a call stuck for good must not keep the process from exiting
            )
            thread.start()
        self._tasks.put(task)

    def _serve(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no caller counts on this thread: end it
                        self._idle -= 1
                        return
                continue  # a caller counted on an idle thread: its call is on the way
            try:
                task()
            except Exception:  # noqa: BLE001 - the thread serves the next call regardless
                logger.exception("a watched hook call failed outside the hook")
            with self._lock:
                if self._idle >= self._max_idle:
                    return
                self._idle += 1


#: Shared by every `Watchdog`; a child process after fork starts with no threads, so none idle.
_WORKERS: Final = _Workers()
os.register_at_fork(after_in_child=_WORKERS._reset)


class Watchdog:
    """Runs watched hook calls in worker threads, so that the caller can stop waiting.

    The hand-over costs tens of microseconds, little beside a prepare. A call that does not
    return in time is left to finish (Python cannot stop a thread) and tracked in
    :meth:`stuck_calls` until it does; its result is then discarded, since the caller answered
    an error long before. Listeners (:meth:`subscribe`) hear of each timeout and of each stuck
    call that returns, to count them and to clean up after them.
    """

    def __init__(
        self,
        backend: str,
        limits: HookLimits,
        locate: Callable[[FrameType | None], tuple[str, str]],
    ) -> None:
        self.backend = backend
        self.limits = limits
        self._locate = locate
        self._lock = threading.Lock()
        self._stuck: dict[_Outcome[Any], StuckCall] = {}
        self._listeners: list[tuple[Callable[[StuckCall], None], Callable[[StuckCall], None]]] = []

    def stuck_calls(self) -> list[StuckCall]:
        """The calls that timed out and still run, oldest first."""
        with self._lock:
            return sorted(self._stuck.values(), key=lambda c: c.started)

    def subscribe(
        self, on_timeout: Callable[[StuckCall], None], on_return: Callable[[StuckCall], None]
    ) -> Callable[[], None]:
        """Call ``on_timeout`` when a call times out, ``on_return`` when a stuck one returns.

        Both run in the thread concerned (the caller's, the call's) and must not block.
        Returns the function that unsubscribes.
        """
        pair = (on_timeout, on_return)
        with self._lock:
            self._listeners.append(pair)

        def unsubscribe() -> None:
            with self._lock:
                if pair in self._listeners:
                    self._listeners.remove(pair)

        return unsubscribe

    def call(self, hook: str, target: Callable[[], T], claim: ClaimRef | None = None) -> T:
        """``target()``, run in a worker thread, waited for at most ``hook``'s limit.

        :raises HookStuck: an earlier call for ``claim`` (or of ``hook``, without a claim) has
            not returned, or too many calls are stuck; ``target`` is not called.
        :raises HookTimeout: ``target`` did not return in time.
        """
        limit = self.limits.of(hook)
        if self._stuck:  # read without the lock: a stale answer only costs the check below
            self._refuse_if_stuck(hook, claim)
        outcome: _Outcome[T] = _Outcome()
        context = contextvars.copy_context()  # the caller's log context goes along
        started = time.monotonic()
        try:
            _WORKERS.submit(lambda: self._run(outcome, context, target))
        except RuntimeError as exc:  # no thread can be started: the process is at its limit
            raise HookError(self.backend, hook, exc) from exc
        if not outcome.done.wait(limit):
            stuck = self._timed_out(hook, claim, started, limit, outcome)
            if stuck is not None:
                raise HookTimeout(
                    stuck.plugin, hook, self._timeout_detail(stuck), claim, self.backend
                )
        return outcome.result()

    def _run(
        self, outcome: _Outcome[T], context: contextvars.Context, target: Callable[[], T]
    ) -> None:
        outcome.thread = threading.get_ident()
        try:
            outcome.value = context.run(target)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            outcome.error = exc
        with self._lock:  # `_timed_out` decides under it whether the call finished in time
            outcome.done.set()
            stuck = self._stuck.pop(outcome, None)
            listeners = [on_return for _, on_return in self._listeners] if stuck else []
        if stuck is None:
            return
        failed = f"; it failed: {outcome.error}" if outcome.error is not None else ""
        logger.bind(claim=stuck.claim.uid if stuck.claim else None).warning(
            "{} returned after {:.1f} s, {:.1f} s past its limit; its result is discarded{}",
            stuck.describe(),
            stuck.age(),
            stuck.age() - stuck.limit,
            failed,
        )
        self._notify(listeners, stuck)

    def _timed_out(
        self,
        hook: str,
        claim: ClaimRef | None,
        started: float,
        limit: float,
        outcome: _Outcome[Any],
    ) -> StuckCall | None:
        """Record ``outcome``'s call as stuck; None when it finished in the meantime."""
        frame = sys._current_frames().get(outcome.thread or 0)
        plugin, where = self._locate(frame)
        del frame  # a frame holds its locals: do not keep it past this point
        with self._lock:
            if outcome.done.is_set():
                return None
            stuck = StuckCall(hook, plugin, claim, started, limit, where)
            self._stuck[outcome] = stuck
            listeners = [on_timeout for on_timeout, _ in self._listeners]
        self._notify(listeners, stuck)
        return stuck

    @staticmethod
    def _notify(listeners: Iterable[Callable[[StuckCall], None]], stuck: StuckCall) -> None:
        for listener in listeners:
            try:
                listener(stuck)
            except Exception:  # noqa: BLE001 - a listener must not break the call it hears of
                logger.exception("a watchdog listener failed on {}", stuck.describe())

    def _timeout_detail(self, stuck: StuckCall) -> str:
        return (
            f"no answer within {stuck.limit:g} s{_for(stuck.claim)} (running in {stuck.where}); "
            f"{_ON_TIMEOUT[stuck.hook]}. The call is left running (metric "
            f"dra_backend_calls_stuck) and later calls {_scope(stuck.claim, stuck.hook)} "
            f"fail at once until it returns; if it still runs {self.limits.stuck:g} s after it "
            f"began, /healthz fails so that the agent is restarted. The backend's log may tell "
            f"what it waits for"
        )

    def _refuse_if_stuck(self, hook: str, claim: ClaimRef | None) -> None:
        stuck = self.stuck_calls()
        for call in stuck:
            if claim is not None and call.claim is not None:
                same = call.claim.uid == claim.uid
            else:
                same = claim is None and call.claim is None and call.hook == hook
            if same:
                whose = f" for claim {claim}: its" if claim is not None else ": an"
                detail = (
                    f"not called{whose} earlier {_CALLS[call.hook]} (by {call.plugin!r}) has "
                    f"not returned after {call.age():.0f} s (running in {call.where}); calls "
                    f"{_scope(claim, hook)} fail at once until it returns, and /healthz "
                    f"fails if it still runs {self.limits.stuck:g} s after it began, so that "
                    f"the agent is restarted"
                )
                raise HookStuck(call.plugin, hook, detail, claim, self.backend)
        if len(stuck) >= MAX_STUCK_CALLS:
            oldest = stuck[0]
            detail = (
                f"not called: {len(stuck)} calls of backend {self.backend!r} have not returned "
                f"(the oldest, a {_CALLS[oldest.hook]}{_for(oldest.claim)}, after "
                f"{oldest.age():.0f} s): the backend is wedged; /healthz fails "
                f"{self.limits.stuck:g} s after that call began, so that the agent is restarted"
            )
            raise HookStuck(self.backend, hook, detail, claim, self.backend)


def _scope(claim: ClaimRef | None, hook: str) -> str:
    """The calls refused while a call is stuck: those for its claim, or those of its hook."""
    return "for this claim" if claim is not None else f"for {_CALLS[hook]}"


def _for(claim: ClaimRef | None) -> str:
    return f" for claim {claim}" if claim is not None else ""

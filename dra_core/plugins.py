"""Loading backends and extension plugins, and calling their hooks through a typed facade.

The backend named by ``--backend`` is loaded strictly: missing, broken, or installed twice
under one name is a :class:`PluginLoadError` that names it, its distribution and the
installed backends. Extension plugins load tolerantly (a warning) unless strict loading is
asked for. Every hook call goes through :class:`Hooks`, which gives call sites types and turns
an exception into a :class:`HookError` naming the plugin and the hook.

The calls that touch hardware or files (prepare, unprepare, check_allocation, decode_config,
discover, device_health) are bounded in time by a :class:`Watchdog`: each runs in a thread of
its own while the caller waits at most its limit (:class:`HookLimits`). A call that does not
return in time fails with :class:`HookTimeout` and goes on running, tracked as stuck: Python
cannot stop a thread, but the caller is free again and releases the driver lock. Until a stuck
call returns, a new call for the same claim (or of the same claim-less hook) fails at once with
:class:`HookStuck`, so one wedged device does not pile up threads; the agent's liveness check
fails once a call has been stuck longer than ``HookLimits.stuck``, so that it is restarted.
"""

from __future__ import annotations

import contextvars
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, Generic, TypeVar

import importlib_metadata
import pluggy
from loguru import logger

from dra_core import hookspecs
from dra_core.hookspecs import BackendOption, DoctorCheck, NodeContext
from dra_core.model import (
    AllocatedClaim,
    AttributeValue,
    BackendIdentity,
    ClaimRef,
    Device,
    DeviceClassSpec,
    DeviceHealth,
    Inventory,
    PreparedClaim,
    PreparedDevice,
)

__all__ = (
    "BACKEND_GROUP",
    "MAX_STUCK_CALLS",
    "PLUGIN_GROUP",
    "WATCHED_HOOKS",
    "EntryPointInfo",
    "HookError",
    "HookLimits",
    "HookStuck",
    "HookTimeout",
    "Hooks",
    "PluginLoadError",
    "StuckCall",
    "Watchdog",
    "from_objects",
    "installed_backends",
    "installed_plugins",
    "load",
)

BACKEND_GROUP: Final = "dra_core.backends"
PLUGIN_GROUP: Final = "dra_core.plugins"
#: Set to "1" to make a broken extension plugin fatal, as a broken backend always is.
STRICT_PLUGINS_ENV: Final = "DRA_STRICT_PLUGINS"
#: Comma-separated extension plugin names not to load.
DISABLED_PLUGINS_ENV: Final = "DRA_DISABLED_PLUGINS"

T = TypeVar("T")


class PluginLoadError(Exception):
    """A backend or plugin could not be loaded; the message says which and what is installed."""


class HookError(Exception):
    """A hook implementation raised; ``plugin`` and ``hook`` name it, ``__cause__`` is the error."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} hook {hook!r} failed: {cause}")


class HookTimeout(HookError):
    """A watched hook call did not return within its limit; it goes on, tracked as stuck.

    ``claim`` is the claim it was called for (None for discovery and config decoding);
    ``__cause__`` is a TimeoutError whose message says how long, where it runs and what next.
    """

    def __init__(self, plugin: str, hook: str, detail: str, claim: ClaimRef | None) -> None:
        cause = TimeoutError(detail)
        super().__init__(plugin, hook, cause)
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
    """What a watched call came to; ``finished`` changes under the watchdog's lock."""

    __slots__ = ("done", "error", "finished", "thread", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        #: The ident of the thread running the call, once it runs.
        self.thread: int | None = None
        self.finished = False
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
                raise HookTimeout(stuck.plugin, hook, self._timeout_detail(stuck), claim)
        return outcome.result()

    def _run(
        self, outcome: _Outcome[T], context: contextvars.Context, target: Callable[[], T]
    ) -> None:
        outcome.thread = threading.get_ident()
        try:
            outcome.value = context.run(target)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            outcome.error = exc
        with self._lock:
            outcome.finished = True
            stuck = self._stuck.pop(outcome, None)
            listeners = [on_return for _, on_return in self._listeners] if stuck else []
        outcome.done.set()
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
            if outcome.finished:
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

    def _scope(self, claim: ClaimRef | None, hook: str) -> str:
        return "for this claim" if claim is not None else f"of {hook}"

    def _timeout_detail(self, stuck: StuckCall) -> str:
        claim = f" for claim {stuck.claim}" if stuck.claim is not None else ""
        return (
            f"no answer within {stuck.limit:g} s{claim} (running in {stuck.where}); "
            f"{_ON_TIMEOUT[stuck.hook]}. The call is left running (metric "
            f"dra_backend_calls_stuck) and later calls {self._scope(stuck.claim, stuck.hook)} "
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
                    f"not called{whose} earlier {call.hook} call (plugin {call.plugin!r}) has "
                    f"not returned after {call.age():.0f} s (running in {call.where}); calls "
                    f"{self._scope(claim, hook)} fail at once until it returns, and /healthz "
                    f"fails if it still runs {self.limits.stuck:g} s after it began, so that "
                    f"the agent is restarted"
                )
                raise HookStuck(call.plugin, hook, detail, claim)
        if len(stuck) >= MAX_STUCK_CALLS:
            oldest = stuck[0]
            detail = (
                f"not called: {len(stuck)} calls of backend {self.backend!r} have not returned "
                f"(the oldest, {oldest.describe()}, after {oldest.age():.0f} s): the backend is "
                f"wedged; /healthz fails {self.limits.stuck:g} s after that call began, so "
                f"that the agent is restarted"
            )
            raise HookStuck(self.backend, hook, detail, claim)


@dataclass(frozen=True)
class EntryPointInfo:
    """An installed backend or plugin, as ``dra-core backends`` lists it."""

    name: str
    group: str
    value: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...] = field(default=())
    error: str | None = None

    @property
    def origin(self) -> str:
        if self.distribution is None:
            return self.value
        return f"{self.distribution} {self.version}"


def _entry_points(group: str) -> list[importlib_metadata.EntryPoint]:
    return list(importlib_metadata.entry_points(group=group))


def _describe(ep: importlib_metadata.EntryPoint) -> EntryPointInfo:
    dist = ep.dist
    return EntryPointInfo(
        name=ep.name,
        group=ep.group,
        value=ep.value,
        distribution=dist.name if dist is not None else None,
        version=dist.version if dist is not None else None,
    )


def _with_hooks(info: EntryPointInfo, ep: importlib_metadata.EntryPoint) -> EntryPointInfo:
    try:
        module = ep.load()
    except Exception as exc:  # noqa: BLE001 - listing must show a broken plugin, not die of it
        return replace(info, error=f"{type(exc).__name__}: {exc}")
    hooks = tuple(
        sorted(n for n in dir(module) if n.startswith("dra_") and callable(getattr(module, n)))
    )
    return replace(info, hooks=hooks)


def installed_backends(*, with_hooks: bool = False) -> list[EntryPointInfo]:
    """The backends installed in this environment, sorted by name."""
    eps = _entry_points(BACKEND_GROUP)
    infos = [_with_hooks(_describe(ep), ep) if with_hooks else _describe(ep) for ep in eps]
    return sorted(infos, key=lambda i: (i.name, i.distribution or ""))


def installed_plugins(*, with_hooks: bool = False) -> list[EntryPointInfo]:
    """The extension plugins installed in this environment, sorted by name."""
    eps = _entry_points(PLUGIN_GROUP)
    infos = [_with_hooks(_describe(ep), ep) if with_hooks else _describe(ep) for ep in eps]
    return sorted(infos, key=lambda i: (i.name, i.distribution or ""))


def _installed_names() -> str:
    names = sorted({ep.name for ep in _entry_points(BACKEND_GROUP)})
    return ", ".join(names) if names else "none"


def _load_entry_point(ep: importlib_metadata.EntryPoint, kind: str) -> object:
    try:
        return ep.load()
    except Exception as exc:
        info = _describe(ep)  # reads the distribution's metadata: only for the message
        msg = (
            f"{kind} {ep.name!r} from {info.origin} cannot be imported ({ep.value}): "
            f"{type(exc).__name__}: {exc}. Reinstall it, or choose another; installed backends: "
            f"{_installed_names()}"
        )
        raise PluginLoadError(msg) from exc


def _load_backend(name: str, candidates: Iterable[importlib_metadata.EntryPoint]) -> object:
    matches = [ep for ep in candidates if ep.name == name]
    if not matches:
        msg = (
            f"backend {name!r} is not installed (no entry point {name!r} in group "
            f"{BACKEND_GROUP!r}); installed backends: {_installed_names()}"
        )
        raise PluginLoadError(msg)
    origins = sorted({_describe(ep).origin for ep in matches}) if len(matches) > 1 else []
    if len(origins) > 1:
        msg = (
            f"backend {name!r} is registered by more than one distribution ({', '.join(origins)}); "
            f"uninstall all but one"
        )
        raise PluginLoadError(msg)
    return _load_entry_point(matches[0], "backend")


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load(
    backend: str,
    *,
    plugins: bool = True,
    strict_plugins: bool | None = None,
    extra: Sequence[tuple[str, object]] = (),
) -> Hooks:
    """Load the backend called ``backend`` and the installed extension plugins.

    :param backend: the entry-point name of the backend.
    :param plugins: load extension plugins too.
    :param strict_plugins: make a broken extension plugin fatal; defaults to the
        ``DRA_STRICT_PLUGINS`` environment variable.
    :param extra: ``(name, module_or_object)`` pairs registered as well (tests, embedding).
    :raises PluginLoadError: the backend is missing or broken, or a strict plugin is.
    """
    pm = _plugin_manager()
    installed = importlib_metadata.entry_points()  # one scan of the installed distributions
    module = _load_backend(backend, installed.select(group=BACKEND_GROUP))
    _register(pm, backend, module)
    if strict_plugins is None:
        strict_plugins = os.environ.get(STRICT_PLUGINS_ENV, "") == "1"
    if plugins:
        disabled = {n.strip() for n in os.environ.get(DISABLED_PLUGINS_ENV, "").split(",") if n}
        for ep in installed.select(group=PLUGIN_GROUP):
            if ep.name in disabled or pm.has_plugin(ep.name):
                continue
            try:
                _register(pm, ep.name, _load_entry_point(ep, "plugin"))
            except PluginLoadError as exc:
                if strict_plugins:
                    raise
                logger.warning(
                    "{} (loading without it; set {}=1 to make this fatal)", exc, STRICT_PLUGINS_ENV
                )
    for name, obj in extra:
        _register(pm, name, obj)
    return Hooks(pm, backend)


def from_objects(backend: str, module: object, *extras: tuple[str, object]) -> Hooks:
    """Hooks over plugin objects given directly, without entry points (tests, embedding)."""
    pm = _plugin_manager()
    _register(pm, backend, module)
    for name, obj in extras:
        _register(pm, name, obj)
    return Hooks(pm, backend)


def _register(pm: pluggy.PluginManager, name: str, obj: object) -> None:
    try:
        pm.register(obj, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        msg = f"plugin {name!r} does not fit the dra-core contract: {exc}"
        raise PluginLoadError(msg) from exc


class Hooks:
    """The typed facade over ``pm.hook``: one method per hookspec, keyword arguments only.

    Exceptions raised by an implementation come out as :class:`HookError` naming the plugin
    and the hook, with the original exception as ``__cause__``. The hooks in
    :data:`WATCHED_HOOKS` are bounded in time by ``watchdog`` (its ``limits`` may be changed).
    """

    def __init__(
        self, pm: pluggy.PluginManager, backend: str, limits: HookLimits | None = None
    ) -> None:
        self.pm = pm
        self.backend = backend
        self.watchdog = Watchdog(backend, limits or HookLimits(), self._locate)

    def _locate(self, frame: FrameType | None) -> tuple[str, str]:
        """The plugin a stuck call's innermost ``frame`` runs in, and its innermost frames."""
        hooks = (*WATCHED_HOOKS, "dra_container_edits", "dra_device_attributes")
        codes = {
            impl.function.__code__: impl.plugin_name
            for hook in hooks
            for impl in getattr(self.pm.hook, hook).get_hookimpls()
        }
        places: list[str] = []
        culprit = None
        while frame is not None:
            code = frame.f_code
            place = f"{Path(code.co_filename).name}:{frame.f_lineno} in {code.co_name}"
            if len(places) < 3:
                places.append(place)
            if culprit is None and code in codes:
                culprit = codes[code]
                if place not in places:  # deep in a library: name the hook's line too
                    places.extend(("...", place))
            frame = frame.f_back
        return culprit or self.backend, " < ".join(places) or "no Python frame"

    @contextmanager
    def _named(self, hook: str) -> Iterator[None]:
        try:
            yield
        except HookError:
            raise
        except Exception as exc:
            raise HookError(self._culprit(hook, exc), hook, exc) from exc

    def _culprit(self, hook: str, exc: BaseException) -> str:
        """The plugin whose implementation raised, found from the traceback's frames."""
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        codes = {impl.function.__code__: impl.plugin_name for impl in impls}
        tb = exc.__traceback__
        culprit = None
        while tb is not None:
            culprit = codes.get(tb.tb_frame.f_code, culprit)
            tb = tb.tb_next
        return culprit or self.backend

    def _call(self, hook: str, **kwargs: Any) -> Any:
        with self._named(hook):
            return getattr(self.pm.hook, hook)(**kwargs)

    def _each(
        self, hook: str, fallback: Callable[[HookError], None] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call every implementation separately, so one plugin's failure spares the others."""
        results = []
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            args = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                value = impl.function(**args)
            except Exception as exc:
                error = HookError(impl.plugin_name, hook, exc)
                error.__cause__ = exc
                if fallback is None:
                    raise error from exc
                fallback(error)
                continue
            if value is not None:
                results.append((impl.plugin_name, value))
        return results

    def implemented(self, hook: str) -> bool:
        """Whether any loaded plugin implements ``hook``."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    # -- lifecycle -----------------------------------------------------------------------------

    def backend_options(self) -> list[BackendOption]:
        return [opt for opts in self._call("dra_backend_options") for opt in opts]

    def start(self, context: NodeContext) -> None:
        self._call("dra_start", context=context)

    def stop(self, context: NodeContext) -> None:
        def log(error: HookError) -> None:
            logger.opt(exception=error.__cause__).error("{}", error)

        self._each("dra_stop", fallback=log, context=context)

    # -- discovery -----------------------------------------------------------------------------

    def backend_identity(self) -> BackendIdentity:
        identity = self._call("dra_backend_identity")
        if not isinstance(identity, BackendIdentity):
            msg = f"backend {self.backend!r} does not implement dra_backend_identity"
            raise PluginLoadError(msg)
        return identity

    def discover(self, context: NodeContext) -> Inventory:
        """The backend's inventory, with extension plugins' attributes merged in.

        :raises HookTimeout: no inventory within ``limits.discovery`` seconds.
        """
        return self.watchdog.call("dra_discover", lambda: self._discover(context))

    def _discover(self, context: NodeContext) -> Inventory:
        inventory = self._call("dra_discover", context=context)
        if not isinstance(inventory, Inventory):
            msg = f"backend {self.backend!r} returned {type(inventory).__name__} from dra_discover"
            raise HookError(self.backend, "dra_discover", TypeError(msg))
        if not self.implemented("dra_device_attributes"):
            return inventory
        devices = tuple(self._with_attributes(d, context) for d in inventory.devices)
        return replace(inventory, devices=devices)

    def _with_attributes(self, device: Device, context: NodeContext) -> Device:
        def log(error: HookError) -> None:
            logger.bind(device=device.name).warning("{}; attributes ignored", error)

        extra: dict[str, AttributeValue] = {}
        for _, attrs in self._each(
            "dra_device_attributes", fallback=log, device=device, context=context
        ):
            extra.update(attrs)
        return replace(device, attributes={**device.attributes, **extra}) if extra else device

    # -- allocation ----------------------------------------------------------------------------

    def device_classes(self, identity: BackendIdentity) -> list[DeviceClassSpec]:
        return [
            c for cs in reversed(self._call("dra_device_classes", identity=identity)) for c in cs
        ]

    def decode_config(self, parameters: Mapping[str, Any], context: NodeContext) -> object:
        """The backend's decoded config; the raw parameters when no plugin decodes."""

        def decode() -> object:
            result = self._call("dra_decode_config", parameters=parameters, context=context)
            return parameters if result is None else result

        return self.watchdog.call("dra_decode_config", decode)

    def check_allocation(
        self, claim: AllocatedClaim, inventory: Inventory, context: NodeContext
    ) -> None:
        self.watchdog.call(
            "dra_check_allocation",
            lambda: self._each(
                "dra_check_allocation", claim=claim, inventory=inventory, context=context
            ),
            claim.ref,
        )

    # -- prepare -------------------------------------------------------------------------------

    def prepare(self, claim: AllocatedClaim, context: NodeContext) -> list[PreparedDevice]:
        """The backend's prepared devices, with extension plugins' container edits merged in.

        :raises HookTimeout: no answer within ``limits.prepare`` seconds; whatever the call
            goes on to do must be undone by the caller once it returns (`Watchdog.subscribe`).
        """
        return self.watchdog.call("dra_prepare", lambda: self._prepare(claim, context), claim.ref)

    def _prepare(self, claim: AllocatedClaim, context: NodeContext) -> list[PreparedDevice]:
        prepared = self._call("dra_prepare", claim=claim, context=context)
        if prepared is None:
            msg = f"backend {self.backend!r} does not implement dra_prepare"
            raise HookError(self.backend, "dra_prepare", NotImplementedError(msg))
        result = []
        for device in prepared:
            edits = device.edits
            for _, more in self._each(
                "dra_container_edits", device=device, claim=claim, context=context
            ):
                edits = edits.merged(more)
            result.append(replace(device, edits=edits) if edits is not device.edits else device)
        return result

    def unprepare(self, claim: PreparedClaim, context: NodeContext) -> None:
        self.watchdog.call(
            "dra_unprepare",
            lambda: self._call("dra_unprepare", claim=claim, context=context),
            claim.ref,
        )

    # -- health --------------------------------------------------------------------------------

    def device_health(self, inventory: Inventory, context: NodeContext) -> list[DeviceHealth]:
        """Every plugin's health reports; a failing health source is logged and skipped.

        :raises HookTimeout: not every source answered within ``limits.discovery`` seconds.
        """
        return self.watchdog.call(
            "dra_device_health", lambda: self._device_health(inventory, context)
        )

    def _device_health(self, inventory: Inventory, context: NodeContext) -> list[DeviceHealth]:

        def log(error: HookError) -> None:
            logger.warning("{}; its health reports are skipped this round", error)

        return [
            h
            for _, hs in self._each(
                "dra_device_health", fallback=log, inventory=inventory, context=context
            )
            for h in hs
        ]

    # -- diagnostics ---------------------------------------------------------------------------

    def doctor_checks(self, context: NodeContext) -> list[tuple[str, DoctorCheck]]:
        """Every plugin's ``dra-core doctor`` checks, as (plugin name, check).

        A plugin whose hook raises, or returns something other than checks, gets one failed
        check naming it instead; the other plugins' checks are kept.
        """
        checks: list[tuple[str, DoctorCheck]] = []

        def broken(plugin: str, found: str) -> None:
            fix = f"fix or update the plugin {plugin!r}, or uninstall it"
            checks.append((plugin, DoctorCheck.fail(f"checks of plugin {plugin!r}", found, fix)))

        def raised(error: HookError) -> None:
            broken(error.plugin, str(error))

        for plugin, results in self._each("dra_doctor_checks", fallback=raised, context=context):
            if not isinstance(results, Sequence) or isinstance(results, str):
                broken(plugin, f"dra_doctor_checks returned {type(results).__name__}, not a list")
                continue
            for check in results:
                if isinstance(check, DoctorCheck):
                    checks.append((plugin, check))
                else:
                    broken(
                        plugin,
                        f"dra_doctor_checks returned {type(check).__name__}, not DoctorCheck",
                    )
        return checks

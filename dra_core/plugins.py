"""Loading backends and extension plugins, and calling their hooks through a typed facade.

The backend named by ``--backend`` is loaded strictly: missing, broken, or installed twice
under one name is a :class:`PluginLoadError` that names it, its distribution and the
installed backends. Extension plugins load tolerantly (a warning) unless strict loading is
asked for. Every hook call goes through :class:`Hooks`, which gives call sites types and turns
an exception into a :class:`HookError` naming the plugin and the hook. The calls that touch
hardware or files are bounded in time by the watchdog of `dra_core.watchdog`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final

import importlib_metadata
import pluggy

from dra_core import hookspecs, lazylog
from dra_core.errors import consequence
from dra_core.hookspecs import BackendOption, DoctorCheck, NodeContext
from dra_core.lazylog import logger
from dra_core.model import (
    AllocatedClaim,
    AttributeValue,
    BackendIdentity,
    ContainerEdits,
    Device,
    DeviceClassSpec,
    DeviceHealth,
    Inventory,
    PreparedClaim,
    PreparedClaims,
    PreparedDevice,
)
from dra_core.watchdog import WATCHED_HOOKS, HookError, HookLimits, Watchdog

__all__ = (
    "BACKEND_GROUP",
    "PLUGIN_GROUP",
    "EntryPointInfo",
    "HookError",  # defined with the watchdog, which raises it too; imported from here as well
    "Hooks",
    "PluginLoadError",
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


class PluginLoadError(Exception):
    """A backend or plugin could not be loaded; the message says which and what is installed."""


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
        plugin = ep.load()  # a class lists its hook methods without being instantiated
    except Exception as exc:  # noqa: BLE001 - listing must show a broken plugin, not die of it
        return replace(info, error=f"{type(exc).__name__}: {exc}")
    return replace(info, hooks=hook_names(plugin))


def hook_names(plugin: object) -> tuple[str, ...]:
    """The hooks ``plugin`` (a module, class or object) implements, by their spec names."""
    marker = f"{hookspecs.PROJECT}_impl"  # what ``@hookimpl`` sets on a function
    names = set()
    for attribute in dir(plugin):
        options = getattr(getattr(plugin, attribute, None), marker, None)
        if isinstance(options, dict):
            names.add(options.get("specname") or attribute)
    return tuple(sorted(names))


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
    """The plugin object an entry point names: a module or an object with hook methods as it
    is, a class or a factory function called (without arguments) for a new instance, so that
    each :class:`Hooks` (one per agent) has plugin objects of its own."""
    try:
        target = ep.load()
    except Exception as exc:
        info = _describe(ep)  # reads the distribution's metadata: only for the message
        msg = (
            f"{kind} {ep.name!r} from {info.origin} cannot be imported ({ep.value}): "
            f"{type(exc).__name__}: {exc}. Reinstall it, or choose another; installed backends: "
            f"{_installed_names()}"
        )
        raise PluginLoadError(msg) from exc
    return instantiate(target, f"{kind} {ep.name!r} ({ep.value})")


def instantiate(target: object, what: str) -> object:
    """``target`` itself, or a new instance when it is a class or a factory function."""
    if not (inspect.isclass(target) or inspect.isfunction(target)):
        return target
    try:
        return target()
    except Exception as exc:
        msg = (
            f"{what} could not be created: {type(exc).__name__}: {exc} (the core calls a "
            "backend's class or factory without arguments; the node's settings come with "
            "dra_start(context))"
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
        _register(pm, name, instantiate(obj, f"plugin {name!r}"))
    return Hooks(pm, backend)


def from_objects(backend: str, plugin: object, *extras: tuple[str, object]) -> Hooks:
    """Hooks over plugins given directly, without entry points (tests, embedding): modules,
    objects with hook methods, or classes and factories (instantiated as :func:`load` does)."""
    pm = _plugin_manager()
    _register(pm, backend, instantiate(plugin, f"backend {backend!r}"))
    for name, obj in extras:
        _register(pm, name, instantiate(obj, f"plugin {name!r}"))
    return Hooks(pm, backend)


def _register(pm: pluggy.PluginManager, name: str, obj: object) -> None:
    try:
        pm.register(obj, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        msg = f"plugin {name!r} does not fit the dra-core contract: {exc}"
        raise PluginLoadError(msg) from exc
    lazylog.settle()  # a plugin that imported loguru itself logs in the configured format


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
        hooks = (*WATCHED_HOOKS, "dra_container_edits", "dra_claim_edits", "dra_device_attributes")
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
            raise HookError(self._culprit(hook, exc), hook, exc, backend=self.backend) from exc

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
        self,
        hook: str,
        fallback: Callable[[HookError], None] | None = None,
        *,
        fatal_after_all: bool = False,
        **kwargs: Any,
    ) -> list[tuple[str, Any]]:
        """Call every implementation separately, so one plugin's failure spares the others.

        An error that stops the agent (`FatalError`) is raised at once, or with
        ``fatal_after_all`` once every other implementation ran (stopping must reach them all).
        """
        results = []
        fatal: HookError | None = None
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            args = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                value = impl.function(**args)
            except Exception as exc:
                error = HookError(impl.plugin_name, hook, exc, backend=self.backend)
                error.__cause__ = exc
                stops = consequence(exc) == "stop"  # never skipped: the agent stops
                if fallback is None or (stops and not fatal_after_all):
                    raise error from exc
                if stops:
                    fatal = fatal or error
                else:
                    fallback(error)
                continue
            if value is not None:
                results.append((impl.plugin_name, value))
        if fatal is not None:
            raise fatal
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
        """Every plugin's ``dra_stop`` runs, whatever another raised; a `FatalError` is
        raised once all ran (the agent then exits non-zero), any other error is logged."""

        def log(error: HookError) -> None:
            logger.opt(exception=error.__cause__).error("{}", error)

        self._each("dra_stop", fallback=log, fatal_after_all=True, context=context)

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

    def device_classes(
        self, identity: BackendIdentity, options: Mapping[str, str | None] | None = None
    ) -> list[DeviceClassSpec]:
        """Every plugin's DeviceClasses; ``options`` are the backend's option values."""
        found = self._call("dra_device_classes", identity=identity, options=dict(options or {}))
        return [c for cs in reversed(found) for c in cs]

    def decode_config(self, parameters: Mapping[str, Any], context: NodeContext) -> object:
        """The backend's decoded config; the raw parameters when no plugin decodes."""

        def decode() -> object:
            result = self._call("dra_decode_config", parameters=parameters, context=context)
            return parameters if result is None else result

        return self.watchdog.call("dra_decode_config", decode)

    def check_allocation(
        self,
        claim: AllocatedClaim,
        inventory: Inventory,
        context: NodeContext,
        prepared: PreparedClaims | None = None,
    ) -> None:
        """Every plugin's check; ``prepared`` is the view of the other prepared claims."""
        self.watchdog.call(
            "dra_check_allocation",
            lambda: self._each(
                "dra_check_allocation",
                claim=claim,
                inventory=inventory,
                prepared=prepared or PreparedClaims(),
                context=context,
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

    def claim_edits(
        self, claim: AllocatedClaim, devices: Sequence[PreparedDevice], context: NodeContext
    ) -> ContainerEdits:
        """Every plugin's edits of the whole claim, merged.

        Part of preparing the claim, so bounded by the same limit as ``dra_prepare``.
        """

        def merge() -> ContainerEdits:
            edits = ContainerEdits()
            for _, more in self._each(
                "dra_claim_edits", claim=claim, devices=devices, context=context
            ):
                edits = edits.merged(more)
            return edits

        return self.watchdog.call("dra_prepare", merge, claim.ref)

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

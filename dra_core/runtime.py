"""One node agent, wired together and run until it is told to stop.

Start order matters: the checkpoint is opened first (a corrupt one stops the agent before
anything is served), then the sockets are served so the kubelet can register at once (a
prepare or unprepare that arrives this early waits until the agent is ready), then the backend
is started and discovers its devices, the API client is made, and the claim service opens the
gate; last, the slower work runs in the background: reconciliation with the API (retried
until the API server has answered, then repeated every ``reconcile_interval``), publishing,
and the discovery and health loop. Modules that only the later steps need are imported by
them, so that registration does not wait for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dra_core.checkpoint import BOOT_ID_PATH, FILE_NAME, Checkpoint, current_boot_id
from dra_core.errors import TransientError, consequence
from dra_core.fileio import make_directories
from dra_core.hookspecs import NodeContext
from dra_core.kube.ratelimit import DEFAULT_BURST, DEFAULT_QPS
from dra_core.kubelet.health import HealthBoard
from dra_core.kubelet.server import KubeletPlugin, KubeletPluginSettings
from dra_core.kubelet.sockets import DEFAULT_PLUGINS_DIR, DEFAULT_REGISTRATION_DIR
from dra_core.lazylog import logger
from dra_core.model import (
    BackendIdentity,
    ClaimRef,
    ClaimResult,
    DeviceHealth,
    Inventory,
    ModelError,
    validate_driver_name,
    validate_inventory,
)
from dra_core.plugins import Hooks
from dra_core.watchdog import WATCHED_HOOKS, HookError, HookLimits, StuckCall

if TYPE_CHECKING:
    from dra_core.health import HealthTracker
    from dra_core.httpserver import StatusServer
    from dra_core.kube.client import KubeClient
    from dra_core.kube.events import EventRecorder
    from dra_core.kubelet.service import NodeService
    from dra_core.node.service import ClaimService
    from dra_core.slices.publisher import SlicePublisher

__all__ = ("Agent", "AgentSettings", "resolve_identity")

#: How long a kubelet call that arrives while the agent starts waits for it (of the 45 s the
#: kubelet gives a call).
_READY_TIMEOUT_SECONDS = 30.0
#: First and longest wait before reconciliation is tried again while the API is unreachable.
_RECONCILE_RETRY_SECONDS = (2.0, 60.0)


@dataclass(frozen=True)
class AgentSettings:
    """Everything that configures a node agent; the CLI fills it from flags and environment.

    The defaults written here are the only ones: ``dra-core run`` and ``doctor`` take their
    flags' defaults (and the defaults their help shows) from these fields.
    """

    #: The Kubernetes node served (``NODE_NAME`` in a DaemonSet, from the downward API).
    node_name: str
    #: Override of the backend's default driver name (see `resolve_identity`).
    driver_name: str | None = None
    #: Kubeconfig file; None means ``$KUBECONFIG`` or the in-cluster service account.
    kubeconfig: str | None = None
    #: API requests a second the agent sends at most after a burst; 0 disables the limit.
    kube_api_qps: float = DEFAULT_QPS
    #: API requests the agent may send at once after a quiet period.
    kube_api_burst: int = DEFAULT_BURST
    #: Directory of registration sockets the kubelet watches.
    registration_dir: Path = DEFAULT_REGISTRATION_DIR
    #: Parent of the per-driver plugin directory (DRA socket, checkpoint, lock).
    plugins_dir: Path = DEFAULT_PLUGINS_DIR
    #: Dynamic CDI spec directory the container runtime reads.
    cdi_dir: Path = Path("/var/run/cdi")
    #: Set to the pod UID for rolling updates (kubelet 1.33+): per-instance socket names.
    instance_id: str | None = None
    #: Seconds between rediscoveries and health checks.
    poll_interval: float = 5.0
    #: Address of the liveness and metrics endpoint; port 0 disables it.
    http_host: str = "0.0.0.0"  # probes come from the kubelet over the pod IP
    http_port: int = 8080
    #: Where the kernel's boot ID is read; a changed ID means the node rebooted.
    boot_id_file: Path = BOOT_ID_PATH
    #: Seconds between reconciliations once one succeeded (gone claims released, claims of an
    #: earlier boot prepared again); while the API server is unreachable it is retried sooner.
    reconcile_interval: float = 300.0
    #: A kubelet call running longer than this (seconds) makes ``/healthz`` fail when the DRA
    #: socket does not answer; younger calls mean the agent is busy (a slow API), not wedged.
    stuck_call_seconds: float = 180.0
    #: Seconds a prepare, unprepare, allocation check or config decoding of the backend may
    #: take before that claim fails (the call goes on, tracked as stuck).
    prepare_timeout: float = HookLimits.prepare
    #: Seconds a discovery or health check of the backend may take before that round is
    #: skipped (the devices and health last found stay published).
    discovery_timeout: float = HookLimits.discovery
    #: A backend call still running this long after it began (long past its time limit) makes
    #: ``/healthz`` fail: the backend is wedged and the agent must be restarted.
    backend_stuck_seconds: float = HookLimits.stuck
    #: Publish ResourceSlices (off only for local experiments without an API server).
    publish: bool = True
    #: Backend option values, keyed by option name.
    backend_options: Mapping[str, str | None] = field(default_factory=dict)
    #: The backend's section of the configuration file.
    backend_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def below(cls, root: Path, node_name: str, **changes: Any) -> AgentSettings:
        """An agent whose kubelet and CDI directories are below ``root`` (``registry``,
        ``plugins``, ``cdi``) and that serves no status endpoint, as the demo, the benchmarks
        and tests run it; ``changes`` set other fields. Keep ``root`` short: socket paths
        within it are limited to about 100 bytes."""
        fields: dict[str, Any] = {
            "registration_dir": root / "registry",
            "plugins_dir": root / "plugins",
            "cdi_dir": root / "cdi",
            "http_port": 0,
        }
        return cls(node_name=node_name, **{**fields, **changes})

    def plugin_dir(self, driver: str) -> Path:
        return self.plugins_dir / driver


def resolve_identity(hooks: Hooks, driver_name: str | None = None) -> BackendIdentity:
    """The backend's identity under the driver name it serves: ``driver_name`` (the
    ``--driver-name`` override) when given, else the backend's own; checked to be valid.

    Every command that names the driver (``run``, ``discover``, ``doctor``, ``webhook``,
    ``render``, ``demo``) takes it from here, so that an override reaches the sockets, the
    slices, the DeviceClasses and the webhook alike. Raises `ModelError` saying what to fix.
    """
    identity = hooks.backend_identity()
    if driver_name is not None:
        identity = dataclasses.replace(identity, driver_name=driver_name)
    try:
        validate_driver_name(identity.driver_name)
    except ModelError as exc:
        fix = (
            "pass a valid --driver-name (env DRA_DRIVER_NAME)"
            if driver_name is not None
            else f"backend {hooks.backend!r} declares it: pass a valid --driver-name to override it"
        )
        msg = f"{exc}; {fix}"
        raise ModelError(msg) from None
    return identity


class _Gate:
    """The kubelet's `NodeService` while the agent starts: calls wait for the claim service."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._ready = threading.Event()
        self._service: NodeService | None = None
        self._calls: dict[int, float] = {}
        self._calls_lock = threading.Lock()
        self._next_call = 0

    @property
    def is_open(self) -> bool:
        return self._ready.is_set()

    def oldest_call_age(self) -> float | None:
        """Seconds since the oldest prepare or unprepare in flight began (None: none)."""
        with self._calls_lock:
            started = min(self._calls.values(), default=None)
        return None if started is None else time.monotonic() - started

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        with self._calls_lock:
            self._next_call += 1
            key = self._next_call
            self._calls[key] = time.monotonic()
        try:
            yield
        finally:
            with self._calls_lock:
                del self._calls[key]

    def open(self, service: NodeService) -> None:
        self._service = service
        self._ready.set()

    def _wait(self, deadline: float | None = None) -> NodeService:
        timeout = self._timeout
        if deadline is not None:  # a prepare is answered by its deadline, even during start
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        if not self._ready.wait(timeout) or self._service is None:
            msg = (
                f"the agent is still starting (backend and devices not ready after {timeout:.3g} s)"
            )
            raise TransientError(msg)
        return self._service

    def prepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, ClaimResult]:
        with self._tracked():
            return self._wait(deadline).prepare(claims, deadline=deadline)

    def unprepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> Mapping[str, str]:
        with self._tracked():
            return self._wait(deadline).unprepare(claims, deadline=deadline)


class Agent:
    """A running node agent: kubelet plugin, publisher, discovery and health loop."""

    def __init__(
        self, settings: AgentSettings, hooks: Hooks, client: KubeClient | None = None
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self.identity: BackendIdentity = resolve_identity(hooks, settings.driver_name)
        self.driver = self.identity.driver_name
        self.stop_event = threading.Event()
        #: The error that stopped the agent (a `FatalError`): `run` raises it once stopped.
        self.fatal: BaseException | None = None
        #: The pipe that wakes `run` (set while it runs), and the lock that keeps it open
        #: while written to.
        self._wake_fd: int | None = None
        self._wake_fd_lock = threading.Lock()
        self._wake = threading.Event()
        self._reconcile_now = threading.Event()
        hooks.watchdog.limits = HookLimits(
            prepare=settings.prepare_timeout,
            discovery=settings.discovery_timeout,
            stuck=settings.backend_stuck_seconds,
        )
        self._unsubscribe: Callable[[], None] = lambda: None
        self._health_reports: list[DeviceHealth] = []
        #: The inventory and health reports the health tracker last had.
        self._last_polled: tuple[Inventory, list[DeviceHealth]] | None = None
        self.plugin_dir = settings.plugin_dir(self.driver)
        self.context = NodeContext(
            node_name=settings.node_name,
            driver_name=self.driver,
            options=dict(settings.backend_options),
            config=dict(settings.backend_config),
            state_dir=self.plugin_dir / "backend",
            request_rediscovery=self._wake.set,
        )
        self.client = client
        self.board = HealthBoard()
        self.health: HealthTracker | None = None
        self._gate = _Gate(_READY_TIMEOUT_SECONDS)
        self._inventory = Inventory()
        self._published: Inventory | None = None
        self._threads: list[threading.Thread] = []
        self.publisher: SlicePublisher | None = None
        self.plugin: KubeletPlugin | None = None
        self.http: StatusServer | None = None
        self.service: ClaimService | None = None
        self.events: EventRecorder | None = None

    @property
    def inventory(self) -> Inventory:
        return self._inventory

    def start(self) -> None:
        """Start everything; raise with a clear message when the agent cannot serve."""
        started_at = time.monotonic()
        self._unsubscribe = self.hooks.watchdog.subscribe(self._call_timed_out, self._call_returned)
        make_directories(self.plugin_dir, 0o750)  # 0750 whatever the umask
        checkpoint = Checkpoint.open(self.plugin_dir / FILE_NAME)
        health = self.board if self.hooks.implemented("dra_device_health") else None
        self.plugin = KubeletPlugin(
            KubeletPluginSettings(
                driver_name=self.driver,
                registration_dir=self.settings.registration_dir,
                plugin_dir=self.plugin_dir,
                instance_id=self.settings.instance_id,
                health=health,
            ),
            self._gate,
        )
        self.plugin.start()
        logger.info(
            "serving driver {} for node {} ({:.0f} ms after start)",
            self.driver,
            self.settings.node_name,
            (time.monotonic() - started_at) * 1000,
        )
        try:
            self._start_services(checkpoint)
        except BaseException:
            self.plugin.stop(grace=None)
            raise
        logger.info(
            "ready: backend {} started, {} devices ({:.0f} ms after start)",
            self.hooks.backend,
            len(self._inventory.devices),
            (time.monotonic() - started_at) * 1000,
        )
        if self.settings.http_port:
            from dra_core.httpserver import StatusServer

            self.http = StatusServer(
                self.settings.http_host,
                self.settings.http_port,
                probe=self.liveness,
                ready=self.readiness,
            )
            self.http.start()
        if self.settings.publish and self.client is not None:
            from dra_core.slices.publisher import SlicePublisher

            self.publisher = SlicePublisher(self.client, self.driver, self.settings.node_name)
            self.publisher.start()
        self._spawn("reconcile", self._reconcile)
        self._spawn("discovery", self._discovery_loop)

    def _start_services(self, checkpoint: Checkpoint) -> None:
        """Start the backend, discover, connect to the API, and open the gate to the claims."""
        from dra_core.cdi import CdiSpecs
        from dra_core.health import HealthTracker
        from dra_core.node.lock import DriverLock
        from dra_core.node.service import ClaimService

        # The gauges of stuck calls are set once serving: the metrics module is slow to import.
        self._count_stuck_calls()
        self.health = HealthTracker(self.driver, self.settings.node_name, self.board)
        self.hooks.start(self.context)
        self._discover()
        if self.client is None and self.settings.publish:
            from dra_core.kube.client import load_client

            self.client = load_client(
                self.settings.kubeconfig,
                qps=self.settings.kube_api_qps,
                burst=self.settings.kube_api_burst,
            )
        if self.client is not None:
            from dra_core.kube.events import EventRecorder

            self.events = EventRecorder(self.client, self.driver, self.settings.node_name)
            self.events.start()
        self.service = ClaimService(
            hooks=self.hooks,
            context=self.context,
            client=self.client,
            checkpoint=checkpoint,
            cdi=CdiSpecs(self.settings.cdi_dir, self.identity),
            lock=DriverLock(self.plugin_dir / "serialize.lock"),
            inventory=lambda: self._inventory,
            pools={self.settings.node_name},
            boot_id=current_boot_id(self.settings.boot_id_file),
            events=self.events,
            on_fatal=self._must_stop,
        )
        self._gate.open(self.service)

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=f"dra-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def liveness(self) -> list[str]:
        """Problems that need a restart (``/healthz``); an unreachable API server is none.

        The sockets must answer. When every DRA worker is taken by kubelet calls that are
        younger than ``stuck_call_seconds`` (waiting for a slow API server, say), a DRA probe
        that times out in the queue is busyness, not a fault. A backend call still running
        ``backend_stuck_seconds`` after it began (long past its time limit) is a fault: Python
        cannot stop it, and a restart clears it.
        """
        assert self.plugin is not None
        age = self._gate.oldest_call_age()
        busy = age is not None and age < self.settings.stuck_call_seconds
        problems = self.plugin.probe(busy=busy)
        if age is not None and age >= self.settings.stuck_call_seconds:
            problems.append(
                f"a kubelet call has been running for {age:.0f} s "
                f"(limit {self.settings.stuck_call_seconds:g} s): the agent is stuck"
            )
        limit = self.hooks.watchdog.limits.stuck
        for call in self.hooks.watchdog.stuck_calls():
            if call.age() >= limit:
                problems.append(
                    f"backend {call.describe()} has been running for {call.age():.0f} s "
                    f"(time limit {call.limit:g} s, restart after {limit:g} s; in {call.where}): "
                    f"the backend is stuck"
                )
        return problems

    def _call_timed_out(self, call: StuckCall) -> None:
        from dra_core import metrics

        metrics.BACKEND_CALL_TIMEOUTS.labels(hook=call.hook).inc()
        self._count_stuck_calls()

    def _call_returned(self, call: StuckCall) -> None:
        """A stuck call returned: clean up after it now rather than at the next round."""
        self._count_stuck_calls()
        if call.claim is not None:
            # A prepare that timed out left its claim recorded as started, and the undo was
            # refused while the call ran; reconciliation rolls such claims back.
            self._reconcile_now.set()
        else:
            self._wake.set()

    def _count_stuck_calls(self) -> None:
        from dra_core import metrics

        counts = dict.fromkeys(WATCHED_HOOKS, 0)
        for call in self.hooks.watchdog.stuck_calls():
            counts[call.hook] += 1
        for hook, count in counts.items():
            metrics.BACKEND_CALLS_STUCK.labels(hook=hook).set(count)

    def readiness(self) -> list[str]:
        """Why the agent cannot do its whole job now (``/readyz``): starting, or no API."""
        problems = []
        if not self._gate.is_open or self.service is None:
            problems.append("the agent is still starting")
        elif self.client is not None and not self.service.api_reachable:
            state = "not checked yet" if self.service.api_reachable is None else "not reachable"
            problems.append(f"API server {state}: new claims cannot be prepared")
        return problems

    def _reconcile(self) -> None:
        """Reconcile at start, again and again while the API is unreachable, then periodically."""
        assert self.service is not None
        first_retry, longest_retry = _RECONCILE_RETRY_SECONDS
        interval = self.settings.reconcile_interval
        retry = min(first_retry, interval)
        startup = True
        while not self.stop_event.is_set():
            try:
                report = self.service.reconcile(startup=startup)
            except Exception as exc:  # noqa: BLE001 - the loop must survive to try again
                logger.opt(exception=exc).error("reconciliation failed")
                report = None
            what = "start-up reconciliation" if startup else "reconciliation"
            startup = False
            if report is not None:
                for error in report.errors:
                    logger.error("{}: {}", what, error)
                changed = {
                    k: v
                    for k, v in vars(report).items()
                    if v and isinstance(v, list) and k != "errors"
                }
                if changed:
                    logger.info("{}: {}", what, changed)
            if report is None or report.api_unreachable:
                wait = retry
                retry = min(retry * 2, longest_retry, interval)
                logger.info("API server not reachable; reconciling again in {:g} s", wait)
            else:
                wait = interval
                retry = min(first_retry, interval)
            self._reconcile_now.wait(wait)
            self._reconcile_now.clear()
            if self.stop_event.is_set():
                break

    def _discover(self) -> None:
        """Rediscover and check health; publish when the result changed.

        Most rounds find what the last one found: an inventory equal to the current one is
        not validated again, and with the same health reports as well the round ends there,
        as the health tracker would return what it returned last time.
        """
        from dra_core import metrics

        assert self.health is not None
        try:
            inventory = self.hooks.discover(self.context)
            if inventory != self._inventory:  # the current one was validated when it came
                validate_inventory(inventory)
        except (HookError, ModelError) as exc:
            metrics.DISCOVERY_ERRORS.inc()
            logger.error("discovery failed, keeping the last inventory: {}", exc)
            inventory = self._inventory
            self._stop_if_fatal(exc)
        self._inventory = inventory
        try:
            self._health_reports = self.hooks.device_health(inventory, self.context)
        except HookError as exc:  # a timeout: the others are logged and skipped inside
            logger.error("health check failed, keeping the health last reported: {}", exc)
            self._stop_if_fatal(exc)
        polled = (inventory, self._health_reports)
        if polled == self._last_polled:
            return
        self._last_polled = polled
        published = self.health.update(inventory, self._health_reports)
        if published != self._published:
            self._published = published
            self._publish(published)

    def _stop_if_fatal(self, error: BaseException) -> None:
        if consequence(error) == "stop":
            self._must_stop(error)

    def _must_stop(self, error: BaseException) -> None:
        """A `FatalError` came: stop serving; `run` then raises it, so the process exits
        non-zero with its message. The error was logged where it came."""
        if self.fatal is None:
            self.fatal = error
        self.stop_event.set()
        self._wake_run()

    def _wake_run(self) -> None:
        """Wake `run`'s wait: every stop that comes without a signal calls this."""
        with self._wake_fd_lock, contextlib.suppress(OSError):  # full: run is woken anyway
            if self._wake_fd is not None:
                os.write(self._wake_fd, b"!")

    def _publish(self, published: Inventory) -> None:
        if self.publisher is not None:
            # Validated once, as discovered; the health tracker added only the core's taints.
            self.publisher.update(published, validated=True)

    def _discovery_loop(self) -> None:
        if self._published is not None:
            self._publish(self._published)
        while not self.stop_event.is_set():
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()
            if self.stop_event.is_set():
                break
            self._discover()

    def stop(self) -> None:
        """Stop serving; prepared claims stay prepared and slices stay published."""
        self.stop_event.set()
        self._wake_run()
        self._wake.set()
        self._reconcile_now.set()
        if self.plugin is not None:
            self.plugin.stop()
        if self.publisher is not None:
            self.publisher.stop()
        if self.http is not None:
            self.http.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.events is not None:
            self.events.stop()
        self._unsubscribe()
        self.hooks.stop(self.context)

    def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop; raise the error that stopped the
        agent when one did (`FatalError`). Runs the process: besides the signal handlers, it
        freezes what the start loaded out of the garbage collector's full passes."""

        received: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # Not logged here: the handler may run while this thread loads the logger
            # (dra_core.lazylog), whose lock it holds; the loop below logs it.
            received.append(signum)
            self.stop_event.set()

        # Python runs a handler in the main thread, when that thread runs Python code, but the
        # kernel may deliver the signal to any thread. Whichever thread takes it writes to the
        # wake-up pipe, so the main thread waits on the pipe rather than on the event alone.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._wake_fd = wake_w
        try:
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            self.start()
            # What the start loaded (the API client's modules above all) lives as long as the
            # process: kept out of the collector's full passes, each of which paused a prepare
            # for 20-35 ms. (Not collected first: a collection here found nothing, in 30 ms.)
            # Here, as the process's, like the signal handlers.
            gc.freeze()
            try:
                while not self.stop_event.is_set():
                    # Handlers run when select returns. No timeout: an idle agent does not
                    # wake, and a stop without a signal writes to the pipe (`_wake_run`).
                    select.select([wake_r], [], [])
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 64):
                            pass
                if received:
                    logger.info("received {}, stopping", signal.Signals(received[0]).name)
            finally:
                self.stop()
        finally:
            with self._wake_fd_lock:
                self._wake_fd = None
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)
        logger.info("stopped (pid {})", os.getpid())
        if self.fatal is not None:
            raise self.fatal

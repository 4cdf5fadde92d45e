"""Keeping this node's ResourceSlices in the API server equal to the backend's inventory.

`SlicePublisher` owns the slices of one driver on one node (field selector
``spec.nodeName=<node>,spec.driver=<driver>``). A sync reads them, builds the desired slices
(`dra_core.slices.build`), and writes only the difference: creates missing slices, updates
changed ones in place, deletes the rest. Equal slices are never written: the comparison
covers only the fields the publisher owns and normalises what the server adds (quantities in
canonical form, ``timeAdded`` on taints, empty maps, labels of others).

Pool generation: consumers use only a pool's highest generation and treat it as complete when
``resourceSliceCount`` slices exist at it. While the slices at the current generation have
the membership the new inventory gives them (the same device or counter-set names in each
slice, the same slice count), they are updated in place at that generation and missing ones
recreated. When the shape changes, every slice is written at generation + 1 first and the
leftovers deleted after, so no consumer ever takes a mix of old and new slices for a complete
pool. The generation starts from the highest one found in the API, so it stays monotonic
across restarts.

The background thread (`start`/`stop`) debounces `update` bursts, compares again periodically
and when the watch reports a change it did not make (a slice edited or deleted behind its
back, the kubelet wiping a node's slices on restart), and retries API failures with backoff
for as long as the outage lasts. With the watch on (the default), the watch is the source of
truth: syncs compare against the slices it has seen, so a start costs one LIST (the watch's),
one GET of the Node and the watch itself, and nothing is read at rest; the slices are listed
again only when the watch fails or expires (410 Gone). Without the watch, every sync lists.
`stop` leaves the slices in place: a restarted or upgraded agent takes them over, and the
kubelet removes them when no plugin of the driver is left.

What is published is what the API server can enforce (`dra_core.slices.features`): the first
sync whose inventory uses an optional field asks the server once (a dry-run create) which
fields it keeps and which counter layout it accepts; devices it could not keep apart are left
out, with a warning once, ``dra_devices_left_out`` and ``dra_api_feature_kept`` in /metrics.
A server that later drops a field anyway (its gate turned off under a running agent) is
treated as dropping it from then on, and a refused write (HTTP 422) makes the next sync ask
again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from dra_core import metrics
from dra_core.kube.client import ApiError, KubeClient
from dra_core.kube.retry import Backoff, call_with_retries
from dra_core.lazylog import logger
from dra_core.model import Inventory, validate_inventory
from dra_core.slices.build import build_slices
from dra_core.slices.compare import (
    gated_fields,
    generation_of,
    merge_metadata,
    owned_fields_equal,
    pool_of,
    same_shape,
)
from dra_core.slices.features import (
    ALL_KEPT,
    FEATURES,
    LeftOut,
    ServerFeatures,
    probe,
    safe_inventory,
    used_fields,
)
from dra_core.slices.watch import RELIST, SLICES_PATH, SliceWatcher

__all__ = ("PublisherSettings", "SlicePublisher", "SyncResult")

T = TypeVar("T")

_MAX_OWN_VERSIONS = 1000


@dataclass(frozen=True)
class PublisherSettings:
    """Timing of the publisher.

    ``resync_period``: seconds between full comparisons when nothing happens (the watch
    reports drift sooner); with the watch on, they compare against the watch's copy and send
    no request unless something differs. ``debounce``: seconds to wait after an update or a
    watch event so a burst is written once, with its latest state. ``backoff``: delays between
    failed API calls and failed syncs. ``attempts``: tries per API call within one sync before
    the sync fails (and is retried by the loop). ``watch``: whether to watch the slices at all
    (else every sync lists them, and only the periodic resync repairs drift).
    ``watch_timeout``: seconds one watch request lasts.
    """

    resync_period: float = 60.0
    debounce: float = 0.2
    backoff: Backoff = field(default_factory=Backoff)
    attempts: int = 3
    conflict_retries: int = 5
    watch: bool = True
    watch_timeout: int = 300


@dataclass(frozen=True)
class SyncResult:
    """What one sync did: the pool generation, the desired slice count, the devices
    published (after leaving out what the server cannot enforce) and the writes."""

    generation: int
    slices: int
    devices: int = 0
    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    @property
    def writes(self) -> int:
        """Number of API writes of this sync."""
        return len(self.created) + len(self.updated) + len(self.deleted)


class SlicePublisher:
    """Publishes one node's inventory of one driver as a pool of ResourceSlices.

    ``pool_name`` defaults to the node name. Call `update` whenever discovery or health
    changes, `start` once, `stop` at shutdown; or drive it with `sync_once` (tests).
    """

    def __init__(
        self,
        client: KubeClient,
        driver: str,
        node_name: str,
        pool_name: str | None = None,
        settings: PublisherSettings | None = None,
    ) -> None:
        self.client = client
        self.driver = driver
        self.node_name = node_name
        self.pool_name = pool_name or node_name
        self.settings = settings or PublisherSettings()
        self.field_selector = f"spec.nodeName={node_name},spec.driver={driver}"
        #: API writes (create, update, delete) since construction.
        self.writes = 0
        #: Successful syncs since construction.
        self.syncs = 0
        self._cond = threading.Condition()
        self._inventory: Inventory | None = None
        self._desired_seq = 0
        self._synced_seq = 0
        self._dirty = False
        self._drift = False
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()
        self._generation = 0
        self._owner: dict[str, Any] | None = None
        self._owner_checked_at: float | None = None
        self._server: ServerFeatures | None = None
        self._said_left_out: set[tuple[str, str]] = set()
        #: What the last sync left out, per feature the server lacks.
        self.left_out: tuple[LeftOut, ...] = ()
        self._own_versions: set[str] = set()
        self._own_deletes: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._watcher: SliceWatcher | None = None

    # ---------------------------------------------------------------------------- public API

    @property
    def generation(self) -> int:
        """The pool generation last published (0 before the first sync)."""
        return self._generation

    @property
    def dropped_fields(self) -> frozenset[str]:
        """Slice fields the API server drops (their feature gate is off), as far as known."""
        return self._server.dropped if self._server is not None else frozenset()

    @property
    def server_features(self) -> ServerFeatures | None:
        """What the API server keeps, once asked (None before an optional field was used)."""
        return self._server

    def update(self, inventory: Inventory, *, validated: bool = False) -> None:
        """Make ``inventory`` the desired state; the thread writes it after the debounce.

        The inventory is validated here, unless the caller did (``validated``), so a backend
        bug raises `ModelError` (naming the device and the rule) to the caller, and the
        previous state stays published. It is not validated again when it is written.
        """
        if not validated:
            validate_inventory(inventory)
        with self._cond:
            self._inventory = inventory
            self._desired_seq += 1
            self._dirty = True
            self._cond.notify_all()

    def start(self) -> None:
        """Start the sync thread and, unless disabled, the watch thread."""
        if self._threads:
            msg = "SlicePublisher already started"
            raise RuntimeError(msg)
        self._stop.clear()
        loop = threading.Thread(target=self._run, name=f"slices-{self.driver}", daemon=True)
        self._threads.append(loop)
        if self.settings.watch:
            self._watcher = SliceWatcher(
                self.client,
                self.field_selector,
                self._on_watch_event,
                stop=self._stop,
                backoff=self.settings.backoff,
                timeout_seconds=self.settings.watch_timeout,
            )
            self._threads.append(
                threading.Thread(
                    target=self._watcher.run, name=f"slices-watch-{self.driver}", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        logger.info(
            "publishing ResourceSlices of driver {} for node {} (pool {})",
            self.driver,
            self.node_name,
            self.pool_name,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (the published slices stay)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._watcher is not None:
            self._watcher.close()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("thread {} did not stop within {} s", thread.name, timeout)
        self._threads = []
        self._watcher = None

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the latest `update` is published; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._synced_seq < self._desired_seq or self._desired_seq == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def sync_once(self) -> SyncResult:
        """Compare the desired slices with the API and write the difference, once.

        Does nothing before the first `update`. Raises `ApiError` when the API keeps failing
        (after ``settings.attempts`` tries per call).
        """
        with self._sync_lock:
            with self._cond:
                inventory, seq = self._inventory, self._desired_seq
            if inventory is None:
                return SyncResult(generation=self._generation, slices=0)
            started = time.monotonic()
            try:
                result = self._sync(inventory)
            except Exception:
                metrics.PUBLISH_ERRORS.inc()
                raise
            finally:
                metrics.PUBLISH_SECONDS.observe(time.monotonic() - started)
            metrics.PUBLISHED_DEVICES.set(result.devices)
            metrics.PUBLISHED_SLICES.set(result.slices)
            with self._cond:
                self._synced_seq = max(self._synced_seq, seq)
                self.syncs += 1
                self._cond.notify_all()
            if result.writes:
                logger.info(
                    "ResourceSlices of {} on {}: generation {}, {} slices, {} devices; "
                    "created {}, updated {}, deleted {} in {:.3f} s",
                    self.driver,
                    self.node_name,
                    result.generation,
                    result.slices,
                    result.devices,
                    len(result.created),
                    len(result.updated),
                    len(result.deleted),
                    time.monotonic() - started,
                )
            return result

    # ---------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        settings = self.settings
        failures = 0
        watcher = self._watcher
        if watcher is not None:
            # The first comparison uses the watch's list: wait for it rather than list twice.
            while not (watcher.synced.is_set() or self._stop.is_set()):
                watcher.synced.wait(0.5)
        next_sync = time.monotonic()  # a first full comparison right away
        while not self._stop.is_set():
            with self._cond:
                while not (self._dirty or self._drift or self._stop.is_set()):
                    remaining = next_sync - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                triggered = self._dirty or self._drift
            if self._stop.is_set():
                break
            if triggered and self.syncs and settings.debounce > 0:
                # Coalesce a burst: whatever arrives meanwhile is written in this sync.
                self._stop.wait(settings.debounce)
                if self._stop.is_set():
                    break
            with self._cond:
                self._dirty = self._drift = False
            try:
                self.sync_once()
            except Exception as exc:  # noqa: BLE001 - an outage must never end the thread
                failures += 1
                delay = settings.backoff.delay(failures, getattr(exc, "retry_after", None))
                logger.error(
                    "publishing ResourceSlices of {} on {} failed (attempt #{}); "
                    "retrying in {:.1f} s: {}",
                    self.driver,
                    self.node_name,
                    failures,
                    delay,
                    exc,
                )
                next_sync = time.monotonic() + delay
            else:
                failures = 0
                next_sync = time.monotonic() + settings.resync_period

    def _on_watch_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        """A change seen by the watch: resync unless it is the echo of our own write."""
        metadata = obj.get("metadata", {})
        with self._cond:
            if kind in ("ADDED", "MODIFIED") and metadata.get("resourceVersion") in (
                self._own_versions
            ):
                self._own_versions.discard(metadata["resourceVersion"])
                return
            if kind == "DELETED" and metadata.get("name") in self._own_deletes:
                self._own_deletes.discard(metadata["name"])
                return
            if kind != RELIST:
                # Usually drift; occasionally the echo of a write whose response is not
                # back yet. The sync that follows compares (against the watch's copy, without
                # a request) and writes only real differences.
                logger.debug(
                    "watch: ResourceSlice {} {}; comparing again", metadata.get("name", "?"), kind
                )
                if kind == "DELETED":
                    # Deleted by someone else: perhaps the garbage collector after the Node
                    # was replaced (new UID), so look the owner up again.
                    self._owner_checked_at = None
            self._drift = True
            self._cond.notify_all()

    # ---------------------------------------------------------------------------- one sync

    def _sync(self, inventory: Inventory) -> SyncResult:
        owner = self._owner_reference()
        existing = self._existing()
        ours = [s for s in existing if pool_of(s).get("name") == self.pool_name]
        current_generation = max((generation_of(s) for s in ours), default=0)
        self._generation = max(self._generation, current_generation)
        generation = max(self._generation, 1)
        server = self._server_features(inventory)
        published, self.left_out = safe_inventory(inventory, server)
        self._report_left_out(self.left_out)
        dropped = set(server.dropped)
        build = partial(
            build_slices,
            self.driver,
            self.node_name,
            self.pool_name,
            published,
            owner=owner,
            **server.layout,
            validated=True,  # by update
        )
        desired = build(generation)
        current = [s for s in ours if generation_of(s) == current_generation]
        if not same_shape(desired, current, dropped):
            generation = self._generation + 1
            desired = build(generation)
        by_name = {s["metadata"]["name"]: s for s in existing}
        created: list[str] = []
        updated: list[str] = []
        deleted: list[str] = []
        for body in desired:
            name = body["metadata"]["name"]
            actual = by_name.get(name)
            if actual is not None and owned_fields_equal(body, actual, dropped):
                continue
            verb = self._write(body, actual)
            if verb == "create":
                created.append(name)
            elif verb == "update":
                updated.append(name)
        self._generation = generation
        wanted = {b["metadata"]["name"] for b in desired}
        for name in sorted(set(by_name) - wanted):
            self._delete(name)
            deleted.append(name)
        return SyncResult(
            generation=generation,
            slices=len(desired),
            devices=len(published.devices),
            created=tuple(created),
            updated=tuple(updated),
            deleted=tuple(deleted),
        )

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retries(
            fn,
            what=what,
            attempts=self.settings.attempts,
            stop=self._stop,
            backoff=self.settings.backoff,
        )

    def _existing(self) -> list[dict[str, Any]]:
        """The node's slices: the watch's copy when it has one, else a LIST."""
        watcher = self._watcher
        snapshot = watcher.snapshot() if watcher is not None else None
        return snapshot if snapshot is not None else self._list()

    def _list(self) -> list[dict[str, Any]]:
        data = self._call(
            lambda: self.client.get(SLICES_PATH, {"fieldSelector": self.field_selector}),
            f"list ResourceSlices ({self.field_selector})",
        )
        return list(data.get("items") or [])

    def _owner_reference(self) -> dict[str, Any] | None:
        """The Node as owner, looked up once (again after drift, or a resync if missing)."""
        now = time.monotonic()
        checked = self._owner_checked_at
        if checked is not None and (
            self._owner is not None or now - checked < self.settings.resync_period
        ):
            return self._owner
        path = f"/api/v1/nodes/{self.node_name}"
        try:
            node = self._call(lambda: self.client.get(path), f"get Node {self.node_name}")
        except ApiError as exc:
            if exc.retriable:
                raise
            logger.warning(
                "cannot read Node {} ({}); publishing ResourceSlices without an owner "
                "reference, so they are not garbage-collected with the node",
                self.node_name,
                exc,
            )
            self._owner = None
        else:
            uid = node.get("metadata", {}).get("uid")
            self._owner = {"name": self.node_name, "uid": uid} if uid else None
        self._owner_checked_at = now
        return self._owner

    def _write(self, body: dict[str, Any], actual: Mapping[str, Any] | None) -> str:
        """Create or update one slice, re-reading on conflicts; return the verb used."""
        name = body["metadata"]["name"]
        for _ in range(self.settings.conflict_retries):
            try:
                if actual is None:
                    verb = "create"
                    send = partial(self.client.request, "POST", SLICES_PATH, body=body)
                else:
                    verb = "update"
                    path = f"{SLICES_PATH}/{name}"
                    merged = merge_metadata(body, actual)
                    send = partial(self.client.request, "PUT", path, body=merged)
                returned = self._call(send, f"{verb} ResourceSlice {name}")
            except ApiError as exc:
                if exc.status == 422:
                    # Refused: perhaps a server upgraded or reconfigured under us; the next
                    # sync asks again what it keeps and which layout it accepts.
                    self._server = None
                if not (exc.conflict or (exc.not_found and actual is not None)):
                    raise
                # Stale copy (409) or gone meanwhile (404): read again and decide again.
                logger.debug("ResourceSlice {}: {}; reading it again", name, exc)
                actual = self._get(name)
                if actual is not None and owned_fields_equal(
                    body, actual, set(self.dropped_fields)
                ):
                    return "none"
                continue
            self._count_write(verb)
            watcher = self._watcher
            if watcher is not None and returned:
                watcher.remember(returned)
            with self._cond:
                version = (returned or {}).get("metadata", {}).get("resourceVersion")
                if len(self._own_versions) > _MAX_OWN_VERSIONS:  # echoes never seen (no watch)
                    self._own_versions.clear()
                if version:
                    self._own_versions.add(version)
            self._check_dropped(body, returned or {})
            return verb
        msg = (
            f"ResourceSlice {name}: still conflicting after {self.settings.conflict_retries} tries"
        )
        raise ApiError("PUT", f"{SLICES_PATH}/{name}", 409, msg)

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call(
                lambda: self.client.get(f"{SLICES_PATH}/{name}"), f"get ResourceSlice {name}"
            )
        except ApiError as exc:
            if exc.not_found:
                if (watcher := self._watcher) is not None:
                    watcher.forget(name)
                return None
            raise
        if (watcher := self._watcher) is not None:
            watcher.remember(result)
        return result

    def _delete(self, name: str) -> None:
        with self._cond:
            self._own_deletes.add(name)
        try:
            self._call(
                lambda: self.client.request("DELETE", f"{SLICES_PATH}/{name}"),
                f"delete ResourceSlice {name}",
            )
        except ApiError as exc:
            if not exc.not_found:
                with self._cond:
                    self._own_deletes.discard(name)
                raise
        if (watcher := self._watcher) is not None:
            watcher.forget(name)
        self._count_write("delete")

    def _count_write(self, verb: str) -> None:
        self.writes += 1
        metrics.API_WRITES.labels(verb).inc()

    # ---------------------------------------------------------------------------- comparing

    def _check_dropped(self, sent: Mapping[str, Any], returned: Mapping[str, Any]) -> None:
        """Notice fields the server dropped although it kept them when asked (its gate was
        turned off under a running agent): from now on they count as dropped, and the next
        sync publishes what is safe without them."""
        missing = gated_fields(sent.get("spec", {})) - gated_fields(returned.get("spec", {}))
        missing -= self.dropped_fields  # the other slices of the same sync say it again
        if not missing:
            return
        metrics.PUBLISH_ERRORS.inc()
        logger.warning(
            "the API server dropped {} from ResourceSlice {} although it kept them when asked; "
            "publishing again without the devices that need them",
            ", ".join(sorted(missing)),
            sent.get("metadata", {}).get("name"),
        )
        self._learned((self._server or ALL_KEPT).dropping(missing))
        with self._cond:
            self._drift = True
            self._cond.notify_all()

    # ---------------------------------------------------------------------------- features

    def _server_features(self, inventory: Inventory) -> ServerFeatures:
        """What the server keeps; asked once, and only when the inventory needs to know."""
        if self._server is not None:
            return self._server
        if not used_fields(inventory):
            return ALL_KEPT  # nothing optional to lose: no request
        server = self._call(
            lambda: probe(self.client, self.driver, self.node_name),
            "dry-run create a ResourceSlice to learn which fields the API server keeps",
        )
        self._learned(server)
        return server

    def _learned(self, server: ServerFeatures) -> None:
        self._server = server
        for feature in FEATURES:
            metrics.API_FEATURE_KEPT.labels(feature.gate).set(1 if server.keeps(feature) else 0)
        lacking = [f"{f.name} (feature gate {f.gate} off)" for f in FEATURES if not server.keeps(f)]
        layout = (
            "counter sets beside the devices consuming them"
            if server.counters_beside_devices
            else "counter sets in slices of their own"
        )
        if lacking:
            logger.info("the API server lacks {}; it wants {}", ", ".join(lacking), layout)
        else:
            logger.info(
                "the API server keeps every optional ResourceSlice field; it wants {}", layout
            )

    def _report_left_out(self, left_out: tuple[LeftOut, ...]) -> None:
        """Count what is left out per feature gate; warn once per device and reason."""
        counts = {f.gate: 0 for f in FEATURES}
        for entry in left_out:
            counts[entry.feature.gate] += len(entry.devices)
            reason = entry.feature.without
            new = [
                (what, name)
                for what, names in (("out", entry.devices), ("exclusive", entry.exclusive))
                for name in names
                if (f"{reason}/{what}", name) not in self._said_left_out
            ]
            if not new:
                continue
            self._said_left_out.update((f"{reason}/{what}", name) for what, name in new)
            out = [name for what, name in new if what == "out"]
            exclusive = [name for what, name in new if what == "exclusive"]
            logger.warning(
                "{}: {}{}{}. {}",
                entry.feature.why,
                entry.feature.without,
                f"; not published: {', '.join(out)}" if out else "",
                f"; published as exclusive devices: {', '.join(exclusive)}" if exclusive else "",
                entry.feature.fix,
            )
        for gate, count in counts.items():
            metrics.DEVICES_LEFT_OUT.labels(gate).set(count)

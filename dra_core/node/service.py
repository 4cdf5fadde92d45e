"""The prepare and unprepare pipeline behind the kubelet's DRA calls.

For each claim: answer from the checkpoint if it is already prepared; otherwise read the
ResourceClaim, take this driver's results in this node's pool, decode the opaque configs,
let the backend check and prepare, write the CDI spec, and record the claim, in two phases
so that a crash at any step is rolled back on the next call or at start. One claim's failure
is that claim's error; the others go on. Every failure is acted on by what it means
(`dra_core.errors`) and logged once, with the claim, and the plugin and hook as log fields.

The claims of a call are read in parallel, at most `CLAIM_READS_IN_FLIGHT` reads at once for
the agent, without the driver lock, and every request and retry ends by the call's deadline:
a claim not read by then fails with an error that says the API server did not answer in time,
and the kubelet retries it; so does a read whose turn under the client's rate limit would come
too late. The driver lock is waited for until the call's deadline too, by prepare and by
unprepare: a claim whose call could not take it fails with an error naming the holder. Answers
from the checkpoint and unprepares never wait for the API server. A claim UID the checkpoint
records under another namespace or name is refused.

Calls that wait for the driver lock at the same time are prepared together: the first to get
it prepares the claims of all of them, in the order they came, each exactly as it would alone,
but with the checkpoint's flushes shared (a claim's ``started`` record goes to disk with the
``completed`` record of the claim before it), and every call is answered once its claims are
on disk. A storm of prepares thus takes one flush per claim rather than two, and the lock once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, Literal

from dra_core import metrics
from dra_core.cdi import CdiSpecs
from dra_core.checkpoint import Checkpoint, CheckpointError, ClaimRecord
from dra_core.errors import RETRY_NOTE, Consequence, TransientError, consequence
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import ClaimAllocation, ClaimError, fetch_claim, parse_allocation
from dra_core.kube.client import ApiError, KubeClient
from dra_core.kube.events import EventRecorder, ObjectRef
from dra_core.kube.ratelimit import RateLimitTimeout, waits_end_by
from dra_core.kube.retry import Backoff, call_with_retries
from dra_core.lazylog import logger
from dra_core.model import (
    AllocatedClaim,
    ClaimRef,
    ClaimResult,
    Inventory,
    ModelError,
    PreparedClaim,
    PreparedClaims,
    PreparedDevice,
    ResultDevice,
    validate_claim_ref,
)
from dra_core.node.lock import DriverLock
from dra_core.plugins import HookError, Hooks
from dra_core.watchdog import describe

__all__ = (
    "CALLS_WAITING_FOR_API",
    "CLAIM_READS_IN_FLIGHT",
    "DEFAULT_READ_SECONDS",
    "ClaimService",
    "ReconcileReport",
)

#: Claim reads in flight at once for the whole agent: a pod's claims are read in parallel, and
#: a storm of prepares does not flood the API server (the client's token bucket paces it too).
CLAIM_READS_IN_FLIGHT: Final = 8
#: Kubelet calls that may wait for claim reads at once; the new claims of a call beyond it fail
#: within `_PLACE_WAIT_SECONDS` (the kubelet retries). It stays below the kubelet plugin's gRPC
#: workers (`KubeletPluginSettings.max_workers`), so however slow the API server is, workers stay
#: free for calls the checkpoint answers and for unprepares.
CALLS_WAITING_FOR_API: Final = 48
#: Seconds a prepare without a deadline (reconciliation) may spend reading claims: what a
#: kubelet call allows (45 s less the margin kept for the answer).
DEFAULT_READ_SECONDS: Final = 40.0
#: Attempts to read one claim within one call, each bounded by the time the call has left.
_READ_ATTEMPTS: Final = 3
_READ_BACKOFF: Final = Backoff(delays=(0.5, 1.0), cap=5.0)
#: How long a call waits for a place among the `CALLS_WAITING_FOR_API` before it gives up.
_PLACE_WAIT_SECONDS: Final = 0.25
#: A request is not started with less time left than this: its answer would come too late.
_MIN_READ_SECONDS: Final = 0.05
#: Claims named in the description of what holds the driver lock.
_CLAIMS_NAMED: Final = 3


#: How an unprepare that failed leaves its claim, unless said otherwise.
_STAYS_PREPARED = "the claim stays prepared"
#: How an unprepare whose removal from the checkpoint could not be flushed leaves its claim.
_NOT_FLUSHED = (
    "its devices were released and its CDI spec removed, but its removal from the checkpoint "
    "may not be on disk; it is flushed again at the kubelet's next call"
)


class _NoTimeLeft(TransientError):
    """The call's deadline came before the claim could be read."""


@dataclass(eq=False)
class _Queued:
    """A claim of a kubelet call, read from the API, waiting to be prepared under the lock."""

    ref: ClaimRef
    allocation: ClaimAllocation
    result: ClaimResult | None = None
    #: Whether a batch has begun to prepare it: from then on it is answered by that batch.
    begun: bool = False


@dataclass(eq=False)
class _Unflushed:
    """A claim prepared and recorded ``completed``, answered once that record is flushed."""

    queued: _Queued
    prepared: PreparedClaim
    started_at: float


@dataclass
class _Removed:
    """A claim of an unprepare call undone, its removal from the checkpoint not yet flushed."""

    ref: ClaimRef
    started_at: float
    #: Whether the checkpoint recorded it (else only an orphaned CDI spec was looked for).
    recorded: bool


@dataclass
class ReconcileReport:
    """What one reconciliation changed; ``api_unreachable`` means it must be run again soon."""

    rolled_back: list[str] = field(default_factory=list)
    regenerated_specs: list[str] = field(default_factory=list)
    removed_orphan_specs: list[str] = field(default_factory=list)
    reprepared: list[str] = field(default_factory=list)
    released_gone_claims: list[str] = field(default_factory=list)
    #: Claims of an earlier boot whose prepare failed (each failure is logged as it happens).
    not_reprepared: list[str] = field(default_factory=list)
    #: Steps that failed, for the caller to log.
    errors: list[str] = field(default_factory=list)
    #: The API server did not answer: gone claims were not released, rebooted claims not
    #: prepared again; the caller retries.
    api_unreachable: bool = False


class ClaimService:
    """Implements the kubelet plugin's ``NodeService``: prepare and unprepare claims."""

    def __init__(
        self,
        *,
        hooks: Hooks,
        context: NodeContext,
        client: KubeClient | None,
        checkpoint: Checkpoint,
        cdi: CdiSpecs,
        lock: DriverLock,
        inventory: Callable[[], Inventory],
        pools: Collection[str],
        boot_id: str,
        events: EventRecorder | None = None,
        claim_reads_in_flight: int = CLAIM_READS_IN_FLIGHT,
        calls_waiting_for_api: int = CALLS_WAITING_FOR_API,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.hooks = hooks
        self.context = context
        self.client = client
        self.checkpoint = checkpoint
        self.cdi = cdi
        self.lock = lock
        self.inventory = inventory
        self.pools = frozenset(pools)
        self.boot_id = boot_id
        self.events = events
        self.driver = context.driver_name
        #: Told of a `FatalError`, once: the agent must stop.
        self.on_fatal = on_fatal
        #: The error that means the agent must stop, once one came.
        self.fatal: BaseException | None = None
        #: Whether the API server answered the last request (None: nothing asked yet).
        self.api_reachable: bool | None = None
        self._api_state = threading.Lock()
        # Shared by every call: bounds the reads in flight, not the claims of one call.
        self._reads = ThreadPoolExecutor(
            max_workers=claim_reads_in_flight, thread_name_prefix="dra-claim-read"
        )
        self._calls_waiting_limit = calls_waiting_for_api
        self._calls_waiting = threading.BoundedSemaphore(calls_waiting_for_api)
        # Claims waiting for the driver lock, and whether a call is preparing a batch of them.
        self._queue: list[_Queued] = []
        self._queue_changed = threading.Condition()
        self._batch_running = False

    def _api_answered(self, reachable: bool) -> None:
        """Record whether the API server answered (an HTTP error other than 429/5xx counts)."""
        with self._api_state:  # claims are read on several threads
            if reachable != self.api_reachable:
                if reachable and self.api_reachable is False:
                    logger.info("API server reachable again")
                elif not reachable:
                    logger.warning("API server not reachable")
            self.api_reachable = reachable
            metrics.API_REACHABLE.set(reachable)

    def check_api(self) -> bool:
        """Ask the API server for its version; True when it answered (or no client is set)."""
        if self.client is None:
            return True
        try:
            self.client.get("/version")
        except ApiError as exc:
            self._api_answered(not exc.retriable)
            if exc.retriable:
                logger.info("API server not reachable: {}", exc)
        else:
            self._api_answered(True)
        return bool(self.api_reachable)

    # -- prepare -------------------------------------------------------------------------------

    def prepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> dict[str, ClaimResult]:
        """Prepare each claim; every requested UID gets a result.

        ``deadline`` (a `time.monotonic` value) is when the results are due: a claim whose
        ResourceClaim could not be read, or the driver lock not taken, by then fails with an
        error that says so. None allows `DEFAULT_READ_SECONDS` for the reads and waits for the
        lock as long as it takes.
        """
        started = time.monotonic()
        read_by = started + DEFAULT_READ_SECONDS if deadline is None else deadline
        results: dict[str, ClaimResult] = {}
        pending: dict[str, ClaimRef] = {}
        for ref in claims:
            if ref.uid in results or ref.uid in pending:
                continue
            try:
                validate_claim_ref(ref)
            except ModelError as exc:
                results[ref.uid] = self._failed(ref, "prepare", exc)
                continue
            done = self._prepared(ref)
            if done is not None:
                results[ref.uid] = done
            else:
                pending[ref.uid] = ref
        # Read claims outside the lock: a slow API must not hold up calls the checkpoint answers.
        allocations: dict[str, ClaimAllocation] = {}
        for uid, outcome in self._read_claims(pending, started, read_by).items():
            if isinstance(outcome, ClaimAllocation):
                allocations[uid] = outcome
            else:
                results[uid] = self._failed(pending[uid], "prepare", outcome)
        queued = [_Queued(pending[uid], allocation) for uid, allocation in allocations.items()]
        if queued:
            self._prepare_queued(queued, deadline)
        for claim in queued:
            assert claim.result is not None  # `_prepare_queued` answers every claim
            results[claim.ref.uid] = claim.result
        return results

    def _prepare_queued(self, claims: Sequence[_Queued], deadline: float | None) -> None:
        """Prepare ``claims`` under the driver lock, with those of the calls waiting for it too.

        The call that finds no batch running waits for the lock (until its deadline) and then
        prepares every claim queued by then; the others wait until their claims are answered
        or, while theirs are still queued, their deadline.
        """
        waited_from = time.monotonic()
        with self._queue_changed:
            self._queue.extend(claims)
            while any(claim.result is None for claim in claims):
                if not self._batch_running:
                    self._batch_running = True
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._give_up(claims, time.monotonic() - waited_from)
                    if all(claim.result is not None for claim in claims):
                        continue
                    left = None  # claims a batch has begun are waited for: it answers them
                self._queue_changed.wait(left)
            else:
                return
        try:
            self._prepare_batch(claims, deadline)
        finally:
            with self._queue_changed:
                self._batch_running = False
                self._queue_changed.notify_all()

    @property
    def queued(self) -> int:
        """Claims read from the API that wait for the driver lock."""
        with self._queue_changed:
            return len(self._queue)

    def _give_up(self, claims: Sequence[_Queued], waited: float) -> None:
        """Fail the claims of ``claims`` no batch has begun: the lock was not free in time.

        Called with the queue's lock held; a batch that reaches such a claim skips it.
        """
        busy = self.lock.busy(waited)
        for claim in claims:
            if claim.result is None and not claim.begun:
                if claim in self._queue:
                    self._queue.remove(claim)
                claim.result = self._failed(claim.ref, "prepare", TransientError(busy))

    def _begins(self, claim: _Queued) -> bool:
        """Mark ``claim`` begun, unless its call gave up waiting (then False)."""
        with self._queue_changed:
            if claim.result is not None:
                return False
            claim.begun = True
            return True

    def _take(self, claims: Sequence[_Queued]) -> list[_Queued]:
        """Those of ``claims`` still queued, taken off the queue."""
        with self._queue_changed:
            taken = [claim for claim in claims if claim in self._queue]
            self._queue = [claim for claim in self._queue if claim not in taken]
        return taken

    def _prepare_batch(self, own: Sequence[_Queued], deadline: float | None) -> None:
        """Take the driver lock for ``own`` claims, then prepare every claim queued."""
        batch: list[_Queued] = []
        try:
            with self.lock.held(deadline, _purpose("prepare", [c.ref for c in own])):
                with self._queue_changed:
                    batch, self._queue = self._queue, []
                self._prepare_locked(batch)
            return
        except Exception as exc:  # noqa: BLE001 - the claims of other calls must be answered too
            error = exc
        for claim in batch or self._take(own):
            if claim.result is None:
                claim.result = self._failed(claim.ref, "prepare", error)

    def _prepared(self, ref: ClaimRef) -> ClaimResult | None:
        """The checkpoint's answer: an earlier prepare of this claim in this boot, or an error
        when it records this UID under another namespace or name; None when it has neither."""
        record = self.checkpoint.get(ref.uid)
        if record is not None and record.claim.ref != ref:
            return self._failed(ref, "prepare", ClaimError(_recorded_as_another_claim(record, ref)))
        if record is None or record.phase != "completed" or record.boot_id != self.boot_id:
            return None
        try:
            if not self.cdi.exists(ref.uid):
                self.cdi.write(record.claim)
            self.checkpoint.flush()  # the record may have been appended but not flushed yet
        except Exception as exc:  # noqa: BLE001 - this claim's failure, not the call's
            return self._failed(ref, "prepare", exc)
        metrics.PREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
        return self._result(record.claim)

    def _read_claims(
        self, pending: Mapping[str, ClaimRef], started: float, read_by: float
    ) -> dict[str, ClaimAllocation | Exception]:
        """Read ``pending`` claims in parallel until ``read_by``: an allocation or an error each."""
        if not pending:
            return {}
        if self.client is None:
            msg = "no Kubernetes API client is configured, so the claim cannot be read"
            return dict.fromkeys(pending, ClaimError(msg))
        # A call that would wait beyond the limit fails its claims soon, so that waiting calls
        # never take every gRPC worker; it waits briefly for a place first, since a burst of
        # new claims fills the places for a few milliseconds when the API server answers fast.
        place_by = min(read_by, time.monotonic() + _PLACE_WAIT_SECONDS)
        if not self._calls_waiting.acquire(timeout=max(0.0, place_by - time.monotonic())):
            return {
                uid: TransientError(
                    f"cannot read ResourceClaim {ref.namespace}/{ref.name}: the API server is "
                    f"slow to answer and {self._calls_waiting_limit} kubelet calls already wait "
                    f"for it"
                )
                for uid, ref in pending.items()
            }
        try:
            reads = {
                uid: self._reads.submit(self._read_claim, ref, read_by)
                for uid, ref in pending.items()
            }
            wait(reads.values(), timeout=max(0.0, read_by - time.monotonic()))
            return {
                uid: self._read_outcome(pending[uid], read, read_by - started)
                for uid, read in reads.items()
            }
        finally:
            self._calls_waiting.release()

    def _read_outcome(
        self, ref: ClaimRef, read: Future[ClaimAllocation], budget: float
    ) -> ClaimAllocation | Exception:
        where = f"cannot read ResourceClaim {ref.namespace}/{ref.name}"
        late = TransientError(
            f"{where}: the API server did not answer in time (not within the {budget:.1f} s "
            f"this kubelet call allows for reading claims)"
        )
        if not read.done():
            read.cancel()  # a read still queued is never sent
            return late
        try:
            return read.result()
        except ClaimError as exc:
            return exc
        except _NoTimeLeft:
            return late
        except RateLimitTimeout as exc:
            return TransientError(f"{where}: {exc}")
        except ApiError as exc:
            if exc.retriable:
                return TransientError(f"{where}: the API server did not answer in time ({exc})")
            return ClaimError(f"{where}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a read's failure is its claim's, not the call's
            return exc

    def _read_claim(self, ref: ClaimRef, read_by: float) -> ClaimAllocation:
        """Read and parse one claim, retried, every request and wait ending by ``read_by``."""
        client = self.client
        assert client is not None

        def attempt() -> Mapping[str, Any]:
            left = read_by - time.monotonic()
            if left < _MIN_READ_SECONDS:
                raise _NoTimeLeft
            try:
                claim = fetch_claim(client, ref, timeout=min(client.timeout, left))
            except ApiError as exc:
                self._api_answered(not exc.retriable)
                raise
            except ClaimError:
                self._api_answered(True)
                raise
            self._api_answered(True)
            return claim

        with waits_end_by(read_by):  # a turn under the rate limit that comes too late fails
            claim = call_with_retries(
                attempt,
                what=f"read ResourceClaim {ref.namespace}/{ref.name}",
                attempts=_READ_ATTEMPTS,
                backoff=_READ_BACKOFF,
                deadline=read_by,
            )
        return parse_allocation(claim, ref, self.driver, self.pools)

    def _prepare_locked(self, claims: Sequence[_Queued]) -> None:
        """Prepare ``claims`` in order, each as if it were alone, with the flushes shared.

        Each claim's ``started`` record is flushed before the backend touches its devices, in
        the same flush as the ``completed`` record of the claim before it; a claim is answered
        once its ``completed`` record is flushed.
        """
        unflushed: list[_Unflushed] = []
        for claim in claims:
            if not self._begins(claim):
                continue
            if self.fatal is not None:  # the agent stops: no device is touched any more
                stopping = TransientError(f"the agent is stopping: {self.fatal}")
                claim.result = self._failed(claim.ref, "prepare", stopping)
                continue
            started_at = time.monotonic()
            began = self._begin(claim)
            if began is None:
                continue
            failed = self._flush(unflushed)
            if failed is not None:
                self._undo(claim.ref)
                claim.result = self._failed(claim.ref, "prepare", failed)
                continue
            try:
                devices = self._prepare_devices(began)
                edits = self.hooks.claim_edits(claim=began, devices=devices, context=self.context)
                prepared = PreparedClaim(claim.ref, devices, edits)
                self.cdi.write(prepared)
                self._record(prepared, "completed", durable=False)
            except Exception as exc:  # noqa: BLE001 - any failure is this claim's, and is undone
                self._undo(claim.ref)
                claim.result = self._failed(claim.ref, "prepare", exc)
                continue
            unflushed.append(_Unflushed(claim, prepared, started_at))
        self._flush(unflushed)

    def _flush(self, unflushed: list[_Unflushed]) -> CheckpointError | None:
        """Flush the checkpoint, then answer the claims of ``unflushed`` (and empty it).

        When the flush fails, those claims are undone and fail, and the error is returned.
        """
        try:
            self.checkpoint.flush()
        except CheckpointError as exc:
            for done in unflushed:
                self._undo(done.queued.ref)
                done.queued.result = self._failed(done.queued.ref, "prepare", exc)
            unflushed.clear()
            return exc
        for done in unflushed:
            ref, prepared = done.queued.ref, done.prepared
            metrics.PREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
            metrics.PREPARE_SECONDS.observe(time.monotonic() - done.started_at)
            logger.bind(claim=ref.uid).info(
                "prepared claim {}: {}",
                ref,
                ", ".join(d.allocation.device for d in prepared.devices),
            )
            done.queued.result = self._result(prepared)
        if unflushed:
            metrics.PREPARED_CLAIMS.set(len(self.checkpoint))
        unflushed.clear()
        return None

    def _undo(self, ref: ClaimRef) -> None:
        """Roll back whatever a failed prepare of ``ref`` left; a failure is logged."""
        try:
            self._roll_back(self.checkpoint.get(ref.uid))
        except Exception as undo:  # noqa: BLE001 - this claim's failure; the others go on
            self._act_on(undo)
            logger.bind(claim=ref.uid, **_origin(undo)).error(
                "undoing the failed prepare of claim {} failed too; it is undone again at the "
                "next call: {}",
                ref,
                undo,
            )

    def _begin(self, queued: _Queued) -> AllocatedClaim | None:
        """Check ``queued`` and record it ``started`` (not flushed); None when it got its
        result instead (already prepared, or failed)."""
        ref, allocation = queued.ref, queued.allocation
        log = logger.bind(claim=ref.uid)
        done = self._prepared(ref)  # another call may have finished it while we read the API
        if done is not None:
            queued.result = done
            return None
        stale = self.checkpoint.get(ref.uid)
        if stale is not None:
            log.info(
                "claim {} was {} in an earlier run; undoing before preparing again",
                ref,
                "prepared before a reboot" if stale.phase == "completed" else "interrupted",
            )
            try:
                self._roll_back(stale)
            except Exception as exc:  # noqa: BLE001 - this claim's failure; the others go on
                queued.result = self._failed(ref, "prepare", exc, "cannot undo an earlier prepare")
                return None
        try:
            claim = self._allocated_claim(ref, allocation)
            self.hooks.check_allocation(
                claim=claim,
                inventory=self.inventory(),
                context=self.context,
                prepared=self._prepared_claims(ref),
            )
            started = PreparedClaim(ref, tuple(PreparedDevice(a) for a in claim.devices))
            self._record(started, "started", durable=False)  # flushed before the backend acts
        except Exception as exc:  # noqa: BLE001 - this claim's failure; the others go on
            queued.result = self._failed(ref, "prepare", exc)
            return None
        return claim

    def _prepared_claims(self, ref: ClaimRef) -> PreparedClaims:
        """The view of the claims recorded prepared (or started) other than ``ref``."""
        return _RecordedClaims(self.checkpoint, ref.uid)

    def _record(
        self, claim: PreparedClaim, phase: Literal["started", "completed"], *, durable: bool
    ) -> None:
        self.checkpoint.put(
            ClaimRecord(claim=claim, phase=phase, boot_id=self.boot_id, driver=self.driver),
            durable=durable,
        )

    def _allocated_claim(self, ref: ClaimRef, allocation: ClaimAllocation) -> AllocatedClaim:
        """Decode the opaque configs and check the devices are published by this node."""
        inventory = self.inventory()
        for device in allocation.devices:
            if inventory.device(device.device) is None:
                msg = (
                    f"device {device.device} of request {device.request} is not published by "
                    f"this node any more (removed or renamed); delete the pod to reallocate"
                )
                raise ClaimError(msg)
        decoded: dict[str, list[object]] = {d.request: [] for d in allocation.devices}
        for config in allocation.configs:
            try:
                value = self.hooks.decode_config(parameters=config.parameters, context=self.context)
            except HookError as exc:
                if consequence(exc) in ("retry", "stop"):
                    raise
                targets = ", ".join(config.requests) or "all requests"
                source = "DeviceClass" if config.source == "FromClass" else "ResourceClaim"
                msg = f"invalid opaque config for {targets} (from the {source}): {exc.detail}"
                raise ClaimError(msg) from exc
            for request, values in decoded.items():
                if config.applies_to(request):
                    values.append(value)
        configs = {request: tuple(values) for request, values in decoded.items()}
        return AllocatedClaim(ref=ref, devices=allocation.devices, configs=configs)

    def _prepare_devices(self, claim: AllocatedClaim) -> tuple[PreparedDevice, ...]:
        """The backend's prepared devices, one per allocation result, in result order."""
        prepared = self.hooks.prepare(claim=claim, context=self.context)
        by_key = {
            (p.allocation.device, p.allocation.share_id, p.allocation.request): p for p in prepared
        }
        ordered = []
        for device in claim.devices:
            match = by_key.get((device.device, device.share_id, device.request))
            if match is None:
                msg = (
                    f"it returned no device for {device.device} (request {device.request}); "
                    f"this is a bug in the backend"
                )
                raise HookError(self.hooks.backend, "dra_prepare", ClaimError(msg))
            ordered.append(replace(match, allocation=device))
        return tuple(ordered)

    def _result(self, claim: PreparedClaim) -> ClaimResult:
        # Devices without container edits have no CDI device, so no ID; the kubelet accepts that.
        ids = self.cdi.cdi_ids(claim)
        return ClaimResult(
            devices=tuple(
                ResultDevice(
                    request_names=(d.allocation.base_request,),
                    pool_name=d.allocation.pool,
                    device_name=d.allocation.device,
                    cdi_device_ids=ids.get((d.allocation.device, d.allocation.share_id), ()),
                    share_id=d.allocation.share_id,
                )
                for d in claim.devices
            )
        )

    def _failed(
        self, ref: ClaimRef, action: Literal["prepare"], error: Exception, doing: str = ""
    ) -> ClaimResult:
        """The result of a failed prepare of ``ref``, with its event (see `_failure`)."""
        message = self._failure(ref, action, error, doing)
        if self.events is not None:
            claim = ObjectRef(
                "resource.k8s.io/v1", "ResourceClaim", ref.namespace, ref.name, ref.uid
            )
            self.events.warning(claim, "PrepareFailed", f"{self.driver}: {message}")
        return ClaimResult(error=f"{action} of claim {ref} failed: {message}")

    def _failure(
        self,
        ref: ClaimRef,
        action: Literal["prepare", "unprepare"],
        error: Exception,
        doing: str,
        left: str = "",
    ) -> str:
        """What the failed ``action`` of ``ref`` tells the user, once the service acted on what
        ``error`` means (`dra_core.errors`): the failure is counted and logged once, at
        WARNING, or at ERROR with the traceback when it is unexpected; a fatal one stops the
        agent. ``doing`` says what was being done, when the error does not; ``left`` (an
        unprepare's) in what state the claim is left."""
        kind = self._act_on(error)
        text = str(error) if kind != "bug" or isinstance(error, HookError) else describe(error)
        if doing:
            text = f"{doing}: {text}"
        if left:
            text += f"; {left}"
        if kind == "retry" and RETRY_NOTE not in text:
            text += f"{' and' if action == 'unprepare' else ';'} {RETRY_NOTE}"
        elif kind == "stop":
            text += "; the agent stops, to be restarted"
        elif kind == "bug":
            text += " (an unexpected error: the agent's log has its traceback)"
        total = metrics.PREPARE_TOTAL if action == "prepare" else metrics.UNPREPARE_TOTAL
        total.labels(result=metrics.RESULT_ERROR).inc()
        log = logger.bind(claim=ref.uid, **_origin(error))
        if kind == "bug":
            log = log.opt(exception=error)
        level = {"bug": "ERROR", "stop": "CRITICAL"}.get(kind, "WARNING")
        log.log(level, "{} of claim {} failed: {}", action, ref, text)
        return text

    def _act_on(self, error: BaseException) -> Consequence:
        """What ``error`` means; the agent is told to stop when it must (once)."""
        kind = consequence(error)
        core = isinstance(error, CheckpointError | OSError | ModelError)
        # The checkpoint read for a hook's view of the prepared claims fails within the hook.
        viewed = isinstance(error, HookError) and isinstance(error.__cause__, CheckpointError)
        if kind == "bug" and (core or viewed):
            kind = "claim"  # the core's own errors: the message says what to do
        if kind == "stop" and self.fatal is None:
            self.fatal = error
            if self.on_fatal is not None:
                self.on_fatal(error)
        return kind

    # -- unprepare -----------------------------------------------------------------------------

    def unprepare(
        self, claims: Sequence[ClaimRef], deadline: float | None = None
    ) -> dict[str, str]:
        """Unprepare each claim from the checkpoint; unknown claims succeed.

        A claim whose UID the checkpoint records under another namespace or name fails and
        stays prepared. ``deadline`` (a `time.monotonic` value) bounds the wait for the driver
        lock; when it is not free by then, every claim fails and stays prepared.
        """
        results: dict[str, str] = {}
        removed: list[_Removed] = []
        try:
            with self.lock.held(deadline, _purpose("unprepare", claims)):
                for ref in claims:
                    if ref.uid not in results:
                        outcome = self._unprepare_locked(ref)
                        if isinstance(outcome, _Removed):
                            removed.append(outcome)
                            outcome = ""
                        results[ref.uid] = outcome
                self._flush_removals(removed, results)
        except Exception as exc:  # noqa: BLE001 - every claim of the call must be answered
            for ref in claims:
                if ref.uid not in results:
                    results[ref.uid] = self._unprepare_failed(ref, exc)
        return results

    def _unprepare_failed(
        self, ref: ClaimRef, error: Exception, left: str = _STAYS_PREPARED
    ) -> str:
        failure = self._failure(ref, "unprepare", error, "", left)
        return f"unprepare of claim {ref} failed: {failure}"

    def _flush_removals(self, removed: Sequence[_Removed], results: dict[str, str]) -> None:
        """Flush the removals of a call's claims at once, then count and log them; when the
        flush fails, their unprepare fails (the kubelet calls again)."""
        try:
            self.checkpoint.flush()
        except CheckpointError as exc:
            for claim in removed:
                results[claim.ref.uid] = self._unprepare_failed(claim.ref, exc, _NOT_FLUSHED)
            return
        for claim in removed:
            metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
            metrics.UNPREPARE_SECONDS.observe(time.monotonic() - claim.started_at)
            if claim.recorded:
                logger.bind(claim=claim.ref.uid).info("unprepared claim {}", claim.ref)
        if removed:
            metrics.PREPARED_CLAIMS.set(len(self.checkpoint))

    def _unprepare_locked(self, ref: ClaimRef) -> _Removed | str:
        """Undo ``ref``'s prepare, its removal from the checkpoint not flushed yet; the error
        message when it failed."""
        started_at = time.monotonic()
        try:
            validate_claim_ref(ref)
            record = self.checkpoint.get(ref.uid)
            if record is not None and record.claim.ref != ref:
                msg = (
                    f"{_recorded_as_another_claim(record, ref)}; unprepare it under its own "
                    f"namespace and name"
                )
                raise ClaimError(msg)
            if record is None:
                self.cdi.remove(ref.uid)  # an orphan spec, if any: nothing else is known
            else:
                self._roll_back(record, durable=False)  # flushed with the call's others
        except Exception as exc:  # noqa: BLE001 - this claim's failure; the others go on
            return self._unprepare_failed(ref, exc)
        return _Removed(ref, started_at, recorded=record is not None)

    def _roll_back(self, record: ClaimRecord | None, *, durable: bool = True) -> None:
        """Undo a (possibly partial) prepare: backend, CDI spec, then the checkpoint entry
        (flushed, or with ``durable=False`` left for the caller's `Checkpoint.flush`)."""
        if record is None:
            return
        self.hooks.unprepare(claim=record.claim, context=self.context)
        self.cdi.remove(record.claim.ref.uid)
        self.checkpoint.remove(record.claim.ref.uid, durable=durable)

    # -- reconciliation ------------------------------------------------------------------------

    def reconcile(self, *, startup: bool = True) -> ReconcileReport:
        """Bring checkpoint, CDI specs, API claims and hardware into agreement.

        Safe to run at any time (the agent runs it at start and then periodically): local
        repairs hold the driver lock, API reads do not. When the API server does not answer,
        ``api_unreachable`` is set and the API steps are left for the next run.
        """
        report = ReconcileReport()
        reboot: list[ClaimRef] = []
        with self.lock.held(purpose="reconciliation of the checkpoint and the CDI specs"):
            if startup:
                self._reconcile_step(report, [], "", self.cdi.remove_stale_temp_files)
            for uid, record in self.checkpoint.records().items():
                if record.phase == "started":
                    self._reconcile_step(
                        report, report.rolled_back, uid, partial(self._roll_back, record)
                    )
                elif record.boot_id != self.boot_id:
                    reboot.append(record.claim.ref)
                elif not self.cdi.exists(uid):
                    self._reconcile_step(
                        report,
                        report.regenerated_specs,
                        uid,
                        partial(self.cdi.write, record.claim),
                    )
            known = set(self.checkpoint.records())
            specs: set[str] = set()
            self._reconcile_step(report, [], "", lambda: specs.update(self.cdi.claim_uids()))
            for uid in sorted(specs - known):
                self._reconcile_step(
                    report, report.removed_orphan_specs, uid, partial(self.cdi.remove, uid)
                )
        if self.client is not None and not self.check_api():
            report.api_unreachable = True
        else:
            self._release_gone_claims(report)
        reboot = [ref for ref in reboot if self.checkpoint.get(ref.uid) is not None]
        if reboot and not report.api_unreachable:
            # The node rebooted: device state is gone, but the kubelet will not ask again.
            for uid, result in self.prepare(reboot).items():
                (report.not_reprepared if result.error else report.reprepared).append(uid)
            if self.api_reachable is False:
                report.api_unreachable = True
        metrics.PREPARED_CLAIMS.set(len(self.checkpoint))
        return report

    def _reconcile_step(
        self, report: ReconcileReport, done: list[str], uid: str, step: Callable[[], object]
    ) -> None:
        """Run one step of claim ``uid`` (of the CDI directory when empty); a failure goes to
        ``report.errors``, for the caller to log, and the next steps go on."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one claim's failure must not end the run
            if self._act_on(exc) == "bug":
                logger.opt(exception=exc).debug("reconciliation step raised")  # for authors
            where = f"claim {uid}" if uid else f"CDI directory {self.cdi.directory}"
            report.errors.append(f"{where}: {exc}")
        else:
            done.append(uid)

    def _release_gone_claims(self, report: ReconcileReport) -> None:
        """Unprepare claims deleted (or replaced) while the agent was not looking.

        The claims are read without the driver lock (a slow API server must not hold up the
        kubelet's calls); a record is released only if it is still the one that was checked.
        """
        if self.client is None:
            return
        gone: list[ClaimRecord] = []
        for record in self.checkpoint.records().values():
            ref = record.claim.ref
            try:
                claim: Mapping[str, object] = fetch_claim(self.client, ref)
            except ClaimError:
                claim = {}
            except ApiError as exc:
                self._api_answered(not exc.retriable)
                if exc.retriable:
                    logger.info("API server not reachable, claims are checked later: {}", exc)
                    report.api_unreachable = True
                    return
                report.errors.append(f"claim {ref.uid}: {exc}")
                continue
            self._api_answered(True)
            metadata = claim.get("metadata")
            if isinstance(metadata, Mapping) and metadata.get("uid") == ref.uid:
                continue
            gone.append(record)
        if not gone:
            return
        with self.lock.held(purpose="release of claims deleted from the API server"):
            for record in gone:
                uid = record.claim.ref.uid
                if self.checkpoint.get(uid) == record:
                    self._reconcile_step(
                        report, report.released_gone_claims, uid, partial(self._roll_back, record)
                    )


class _RecordedClaims(PreparedClaims):
    """The claims the checkpoint records but one, read when asked: `holding` looks the device
    up in the checkpoint's index, so a check costs the same with 5 or 500 claims prepared."""

    def __init__(self, checkpoint: Checkpoint, excluded_uid: str) -> None:
        super().__init__()
        self._checkpoint = checkpoint
        self._excluded = excluded_uid

    @property
    def claims(self) -> tuple[PreparedClaim, ...]:
        records = self._checkpoint.records()
        return tuple(r.claim for uid, r in records.items() if uid != self._excluded)

    def holding(self, device: str) -> tuple[PreparedClaim, ...]:
        records = self._checkpoint.holding(device)
        return tuple(r.claim for r in records if r.uid != self._excluded)


def _origin(error: BaseException) -> dict[str, str]:
    """The plugin and hook whose call failed, as log fields (for backend authors)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, HookError):
            return {"plugin": seen.plugin, "hook": seen.hook}
        seen = seen.__cause__
    return {}


def _purpose(action: str, refs: Sequence[ClaimRef]) -> str:
    """What a call holds the driver lock for: "prepare of claim default/a (uid)"."""
    named = ", ".join(str(ref) for ref in refs[:_CLAIMS_NAMED])
    more = f" and {len(refs) - _CLAIMS_NAMED} more" if len(refs) > _CLAIMS_NAMED else ""
    return f"{action} of claim{'s' if len(refs) > 1 else ''} {named}{more}"


def _recorded_as_another_claim(record: ClaimRecord, ref: ClaimRef) -> str:
    recorded = record.claim.ref
    return (
        f"this node recorded claim UID {ref.uid} as ResourceClaim "
        f"{recorded.namespace}/{recorded.name}, not {ref.namespace}/{ref.name}; a UID names one "
        f"claim, so the request is refused"
    )

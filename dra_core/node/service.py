"""The prepare and unprepare pipeline behind the kubelet's DRA calls.

For each claim: answer from the checkpoint if it is already prepared; otherwise read the
ResourceClaim, take this driver's results in this node's pool, decode the opaque configs,
let the backend check and prepare, write the CDI spec, and record the claim, in two phases
so that a crash at any step is rolled back on the next call or at start. One claim's failure
is that claim's error; the others go on.

The claims of a call are read in parallel, at most `CLAIM_READS_IN_FLIGHT` reads at once for
the agent, without the driver lock, and every request and retry ends by the call's deadline:
a claim not read by then fails with an error that says the API server did not answer in time,
and the kubelet retries it; so does a read whose turn under the client's rate limit would come
too late. The driver lock is waited for until the call's deadline too, by prepare and by
unprepare: a claim whose call could not take it fails with an error naming the holder. Answers
from the checkpoint and unprepares never wait for the API server. A claim UID the checkpoint
records under another namespace or name is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, Literal

from loguru import logger

from dra_core import metrics
from dra_core.cdi import CdiError, CdiSpecs
from dra_core.checkpoint import Checkpoint, CheckpointError, ClaimRecord
from dra_core.hookspecs import NodeContext
from dra_core.kube.claims import ClaimAllocation, ClaimError, fetch_claim, parse_allocation
from dra_core.kube.client import ApiError, KubeClient
from dra_core.kube.events import EventRecorder, ObjectRef
from dra_core.kube.ratelimit import RateLimitTimeout, waits_end_by
from dra_core.kube.retry import Backoff, call_with_retries
from dra_core.model import (
    AllocatedClaim,
    ClaimRef,
    ClaimResult,
    Inventory,
    ModelError,
    PreparedClaim,
    PreparedDevice,
    ResultDevice,
    validate_claim_ref,
)
from dra_core.node.lock import DriverLock, DriverLockBusy
from dra_core.plugins import HookError, Hooks

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
#: at once (the kubelet retries). It stays below the kubelet plugin's gRPC workers
#: (`KubeletPluginSettings.max_workers`), so however slow the API server is, workers stay free
#: for calls the checkpoint answers and for unprepares.
CALLS_WAITING_FOR_API: Final = 48
#: Seconds a prepare without a deadline (reconciliation) may spend reading claims: what a
#: kubelet call allows (45 s less the margin kept for the answer).
DEFAULT_READ_SECONDS: Final = 40.0
#: Attempts to read one claim within one call, each bounded by the time the call has left.
_READ_ATTEMPTS: Final = 3
_READ_BACKOFF: Final = Backoff(delays=(0.5, 1.0), cap=5.0)
#: A request is not started with less time left than this: its answer would come too late.
_MIN_READ_SECONDS: Final = 0.05
#: Claims named in the description of what holds the driver lock.
_CLAIMS_NAMED: Final = 3


class _NoTimeLeft(Exception):
    """The call's deadline came before the claim could be read."""


@dataclass
class ReconcileReport:
    """What one reconciliation changed; ``api_unreachable`` means it must be run again soon."""

    rolled_back: list[str] = field(default_factory=list)
    regenerated_specs: list[str] = field(default_factory=list)
    removed_orphan_specs: list[str] = field(default_factory=list)
    reprepared: list[str] = field(default_factory=list)
    released_gone_claims: list[str] = field(default_factory=list)
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
        #: Whether the API server answered the last request (None: nothing asked yet).
        self.api_reachable: bool | None = None
        self._api_state = threading.Lock()
        # Shared by every call: bounds the reads in flight, not the claims of one call.
        self._reads = ThreadPoolExecutor(
            max_workers=claim_reads_in_flight, thread_name_prefix="dra-claim-read"
        )
        self._calls_waiting_limit = calls_waiting_for_api
        self._calls_waiting = threading.BoundedSemaphore(calls_waiting_for_api)

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
                results[ref.uid] = self._failed(ref, "prepare", str(exc))
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
        if allocations:
            refs = [pending[uid] for uid in allocations]
            try:
                with self.lock.held(deadline, _purpose("prepare", refs)):
                    for uid, allocation in allocations.items():
                        results[uid] = self._prepare_locked(pending[uid], allocation)
            except DriverLockBusy as exc:
                for ref in refs:
                    results[ref.uid] = self._failed(
                        ref, "prepare", f"{exc}; the kubelet will retry"
                    )
        return results

    def _prepared(self, ref: ClaimRef) -> ClaimResult | None:
        """The checkpoint's answer: an earlier prepare of this claim in this boot, or an error
        when it records this UID under another namespace or name; None when it has neither."""
        record = self.checkpoint.get(ref.uid)
        if record is not None and record.claim.ref != ref:
            return self._failed(ref, "prepare", _recorded_as_another_claim(record, ref))
        if record is None or record.phase != "completed" or record.boot_id != self.boot_id:
            return None
        if not self.cdi.exists(ref.uid):
            self.cdi.write(record.claim)
        metrics.PREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
        return self._result(record.claim)

    def _read_claims(
        self, pending: Mapping[str, ClaimRef], started: float, read_by: float
    ) -> dict[str, ClaimAllocation | str]:
        """Read ``pending`` claims in parallel until ``read_by``: an allocation or an error each."""
        if not pending:
            return {}
        if self.client is None:
            msg = "no Kubernetes API client is configured, so the claim cannot be read"
            return dict.fromkeys(pending, msg)
        # A call that would wait beyond the limit fails its claims at once, so that waiting
        # calls never take every gRPC worker.
        if not self._calls_waiting.acquire(blocking=False):
            return {
                uid: (
                    f"cannot read ResourceClaim {ref.namespace}/{ref.name}: the API server is "
                    f"slow to answer and {self._calls_waiting_limit} kubelet calls already wait "
                    f"for it; the kubelet will retry"
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
    ) -> ClaimAllocation | str:
        where = f"cannot read ResourceClaim {ref.namespace}/{ref.name}"
        late = (
            f"{where}: the API server did not answer in time (not within the {budget:.1f} s "
            f"this kubelet call allows for reading claims); the kubelet will retry"
        )
        if not read.done():
            read.cancel()  # a read still queued is never sent
            return late
        try:
            return read.result()
        except ClaimError as exc:
            return str(exc)
        except _NoTimeLeft:
            return late
        except RateLimitTimeout as exc:
            return f"{where}: {exc}; the kubelet will retry"
        except ApiError as exc:
            if exc.retriable:
                return (
                    f"{where}: the API server did not answer in time ({exc}); "
                    f"the kubelet will retry"
                )
            return f"{where}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a read's failure is its claim's, not the call's
            logger.bind(claim=ref.uid).opt(exception=exc).error("reading claim {} raised", ref)
            return f"{where}: {type(exc).__name__}: {exc}"

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

    def _prepare_locked(self, ref: ClaimRef, allocation: ClaimAllocation) -> ClaimResult:
        log = logger.bind(claim=ref.uid)
        started_at = time.monotonic()
        done = self._prepared(ref)  # another call may have finished it while we read the API
        if done is not None:
            return done
        stale = self.checkpoint.get(ref.uid)
        if stale is not None:
            log.info(
                "claim {} was {} in an earlier run; undoing before preparing again",
                ref,
                "prepared before a reboot" if stale.phase == "completed" else "interrupted",
            )
            try:
                self._roll_back(stale)
            except HookError as exc:
                return self._failed(ref, "prepare", f"cannot undo an earlier prepare: {exc}")
        try:
            claim = self._allocated_claim(ref, allocation)
            self.hooks.check_allocation(
                claim=claim, inventory=self.inventory(), context=self.context
            )
        except (ClaimError, HookError) as exc:
            return self._failed(ref, "prepare", str(exc))
        started = PreparedClaim(ref, tuple(PreparedDevice(a) for a in claim.devices))
        try:
            self._record(started, "started")
        except CheckpointError as exc:
            return self._failed(ref, "prepare", str(exc))
        try:
            prepared = PreparedClaim(ref, self._prepare_devices(claim))
            self.cdi.write(prepared)
            self._record(prepared, "completed")
        except Exception as exc:  # noqa: BLE001 - any failure is this claim's, and is undone
            log.opt(exception=exc).warning("prepare of claim {} failed; undoing", ref)
            try:
                self._roll_back(self.checkpoint.get(ref.uid))
            except (HookError, CheckpointError, OSError) as undo:
                log.error(
                    "undoing claim {} failed too; it is retried at the next call: {}", ref, undo
                )
            return self._failed(ref, "prepare", str(exc))
        metrics.PREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
        metrics.PREPARE_SECONDS.observe(time.monotonic() - started_at)
        metrics.PREPARED_CLAIMS.set(len(self.checkpoint))
        log.info(
            "prepared claim {}: {}", ref, ", ".join(d.allocation.device for d in prepared.devices)
        )
        return self._result(prepared)

    def _record(self, claim: PreparedClaim, phase: Literal["started", "completed"]) -> None:
        self.checkpoint.put(
            ClaimRecord(claim=claim, phase=phase, boot_id=self.boot_id, driver=self.driver)
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
                targets = ", ".join(config.requests) or "all requests"
                source = "DeviceClass" if config.source == "FromClass" else "ResourceClaim"
                msg = f"invalid opaque config for {targets} (from the {source}): {exc.__cause__}"
                raise ClaimError(msg) from None
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
                    f"backend {self.hooks.backend!r} prepared no device for {device.device} "
                    f"(request {device.request}); this is a backend bug"
                )
                raise HookError(self.hooks.backend, "dra_prepare", RuntimeError(msg))
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

    def _failed(self, ref: ClaimRef, action: str, message: str) -> ClaimResult:
        logger.bind(claim=ref.uid).warning("{} of claim {} failed: {}", action, ref, message)
        metrics.PREPARE_TOTAL.labels(result=metrics.RESULT_ERROR).inc()
        if self.events is not None:
            claim = ObjectRef(
                "resource.k8s.io/v1", "ResourceClaim", ref.namespace, ref.name, ref.uid
            )
            self.events.warning(claim, "PrepareFailed", f"{self.driver}: {message}")
        return ClaimResult(error=f"{action} of claim {ref} failed: {message}")

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
        try:
            with self.lock.held(deadline, _purpose("unprepare", claims)):
                for ref in claims:
                    if ref.uid not in results:
                        results[ref.uid] = self._unprepare_locked(ref)
        except DriverLockBusy as exc:
            for ref in claims:
                if ref.uid in results:
                    continue
                logger.bind(claim=ref.uid).warning("unprepare of claim {} failed: {}", ref, exc)
                metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_ERROR).inc()
                results[ref.uid] = (
                    f"unprepare of claim {ref} failed: {exc}; the claim stays prepared and the "
                    f"kubelet will retry"
                )
        return results

    def _unprepare_locked(self, ref: ClaimRef) -> str:
        log = logger.bind(claim=ref.uid)
        started_at = time.monotonic()
        try:
            validate_claim_ref(ref)
        except ModelError as exc:
            metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_ERROR).inc()
            return f"unprepare of claim {ref} failed: {exc}"
        record = self.checkpoint.get(ref.uid)
        if record is not None and record.claim.ref != ref:
            metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_ERROR).inc()
            message = _recorded_as_another_claim(record, ref)
            log.warning("unprepare of claim {} refused: {}", ref, message)
            return (
                f"unprepare of claim {ref} failed: {message}; the claim stays prepared, "
                f"unprepare it under its own namespace and name"
            )
        try:
            if record is None:
                self.cdi.remove(ref.uid)  # an orphan spec, if any: nothing else is known
            else:
                self._roll_back(record)
        except (HookError, OSError) as exc:
            log.opt(exception=exc).warning("unprepare of claim {} failed", ref)
            metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_ERROR).inc()
            return f"unprepare of claim {ref} failed: {exc}"
        metrics.UNPREPARE_TOTAL.labels(result=metrics.RESULT_SUCCESS).inc()
        metrics.UNPREPARE_SECONDS.observe(time.monotonic() - started_at)
        metrics.PREPARED_CLAIMS.set(len(self.checkpoint))
        if record is not None:
            log.info("unprepared claim {}", ref)
        return ""

    def _roll_back(self, record: ClaimRecord | None) -> None:
        """Undo a (possibly partial) prepare: backend, CDI spec, then the checkpoint entry."""
        if record is None:
            return
        self.hooks.unprepare(claim=record.claim, context=self.context)
        self.cdi.remove(record.claim.ref.uid)
        self.checkpoint.remove(record.claim.ref.uid)

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
                self.cdi.remove_stale_temp_files()
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
            for uid in sorted(self.cdi.claim_uids() - known):
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
                if result.error:
                    report.errors.append(result.error)
                else:
                    report.reprepared.append(uid)
            if self.api_reachable is False:
                report.api_unreachable = True
        metrics.PREPARED_CLAIMS.set(len(self.checkpoint))
        return report

    def _reconcile_step(
        self, report: ReconcileReport, done: list[str], uid: str, step: Callable[[], object]
    ) -> None:
        try:
            step()
            done.append(uid)
        except (HookError, OSError, CdiError, CheckpointError) as exc:
            # One claim's failure must not end the run: the others are still reconciled.
            report.errors.append(f"claim {uid}: {exc}")

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

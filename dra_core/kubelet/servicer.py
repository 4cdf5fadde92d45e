"""The kubelet's DRA plugin service, v1 and v1beta1, in front of a `NodeService`.

Both API versions carry the same messages (v1 adds ``Device.share_id``), so one
implementation serves both, parameterised by the generated message module. Whatever the
request or the node service does, every requested claim UID gets an entry in the response:
a malformed claim, a UID the node service forgot and an exception raised by it all become
per-claim errors, never a failed RPC.

A prepare and an unprepare are handed the call's deadline less a margin (`answer_by`), so
that claims the node service could not finish in time are answered as errors before the
kubelet gives up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Final

from dra_core.errors import RETRY_NOTE, consequence
from dra_core.kubelet.grpcserver import CallContext, GrpcServer
from dra_core.kubelet.proto import dra_v1_pb2, dra_v1beta1_pb2
from dra_core.kubelet.service import NodeService
from dra_core.lazylog import logger
from dra_core.model import ClaimRef, ClaimResult, ModelError, validate_claim_ref

__all__ = ["DRAv1Servicer", "DRAv1beta1Servicer", "add_dra_servicers", "answer_by"]

#: Share of a call's remaining time kept for answering (preparing what was read, writing the
#: answer), within bounds: 5 s of the kubelet's 45 s, at least a quarter second.
_ANSWER_MARGIN_SHARE: Final = 0.15
_ANSWER_MARGIN_SECONDS: Final = (0.25, 5.0)
#: gRPC reports a call without a deadline as one that has about 292 years left.
_NO_DEADLINE_SECONDS: Final = 86400.0


def answer_by(time_remaining: float | None) -> float | None:
    """The `time.monotonic` time by which the node service's results are due (None: no
    deadline), given the seconds the caller's deadline leaves."""
    if time_remaining is None or time_remaining >= _NO_DEADLINE_SECONDS:
        return None
    least, most = _ANSWER_MARGIN_SECONDS
    margin = min(most, max(least, time_remaining * _ANSWER_MARGIN_SHARE))
    return time.monotonic() + time_remaining - margin


def _claim_refs(claims: Sequence[Any]) -> tuple[list[ClaimRef], dict[str, str]]:
    """The distinct well-formed claims of a request, and errors for the malformed ones."""
    refs: dict[str, ClaimRef] = {}
    errors: dict[str, str] = {}
    for claim in claims:
        uid = str(claim.uid)
        if uid in refs or uid in errors:
            continue  # a duplicate: answered once
        ref = ClaimRef(namespace=str(claim.namespace), name=str(claim.name), uid=uid)
        if not uid:
            errors[uid] = "the request names a claim with an empty UID; the kubelet sends none"
            continue
        try:
            validate_claim_ref(ref)
        except ModelError as exc:
            errors[uid] = f"malformed claim in the request: {exc}"
            continue
        refs[uid] = ref
    return list(refs.values()), errors


def _call_failed(call: str, claims: Sequence[ClaimRef], exc: Exception) -> dict[str, str]:
    uids = [c.uid for c in claims]
    if consequence(exc) == "retry":  # expected to clear: no traceback
        logger.warning("{} of claims {} failed: {}", call, uids, exc)
        text = f"{call} failed on this node: {exc}; {RETRY_NOTE}"
    else:
        logger.opt(exception=exc).error("{} of claims {} raised: {}", call, uids, exc)
        text = f"{call} failed on this node: {type(exc).__name__}: {exc}"
    return dict.fromkeys(uids, text)


def _warn_extra(call: str, refs: Sequence[ClaimRef], answered: Mapping[str, object]) -> None:
    extra = sorted(set(answered) - {r.uid for r in refs})
    if extra:
        logger.warning("{}: the node service answered unrequested claims {}; dropped", call, extra)


def _missing(call: str, uid: str) -> str:
    logger.bind(claim=uid).error("{}: the node service returned no result for this claim", call)
    return (
        f"{call}: the driver returned no result for claim {uid}; "
        "this is a driver bug, please report it"
    )


class _DRAService:
    """The shared implementation; ``messages`` is the generated ``*_pb2`` module."""

    def __init__(self, service: NodeService, messages: ModuleType, *, share_id: bool) -> None:
        self._service = service
        self._messages = messages
        self._share_id = share_id
        self._version = messages.DESCRIPTOR.package.rsplit(".", 1)[-1]

    def prepare(self, request: Any, deadline: float | None = None) -> Any:
        refs, errors = _claim_refs(request.claims)
        results: Mapping[str, ClaimResult] = {}
        if refs:
            logger.debug("NodePrepareResources ({}) for {}", self._version, [r.uid for r in refs])
            try:
                results = self._service.prepare(refs, deadline=deadline)
                _warn_extra("NodePrepareResources", refs, results)
            except Exception as exc:  # noqa: BLE001 - becomes every claim's error, logged with traceback
                errors.update(_call_failed("NodePrepareResources", refs, exc))
        response = self._messages.NodePrepareResourcesResponse()
        for uid, error in errors.items():
            response.claims[uid].error = error
        for ref in refs:
            if ref.uid in errors:
                continue
            result = results.get(ref.uid)
            entry = response.claims[ref.uid]  # inserts the entry even when it stays empty
            if result is None:
                entry.error = _missing("NodePrepareResources", ref.uid)
                continue
            try:
                self._fill_prepared(ref.uid, entry, result)
            except Exception as exc:  # noqa: BLE001 - a bad result is this claim's error
                logger.bind(claim=ref.uid).opt(exception=exc).error(
                    "cannot convert the prepare result {!r}", result
                )
                entry.Clear()
                entry.error = f"NodePrepareResources: the driver returned an invalid result: {exc}"
        return response

    def _fill_prepared(self, uid: str, entry: Any, result: ClaimResult) -> None:
        log = logger.bind(claim=uid)
        if result.error:
            entry.error = result.error
            log.debug("prepare failed: {}", result.error)  # the node service logged it
            return
        for device in result.devices:
            message = entry.devices.add(
                request_names=list(device.request_names),
                pool_name=device.pool_name,
                device_name=device.device_name,
                cdi_device_ids=list(device.cdi_device_ids),
            )
            if self._share_id and device.share_id is not None:
                message.share_id = device.share_id
        log.debug("prepared {} device(s)", len(result.devices))

    def unprepare(self, request: Any, deadline: float | None = None) -> Any:
        refs, errors = _claim_refs(request.claims)
        results: Mapping[str, str] = {}
        if refs:
            logger.debug("NodeUnprepareResources ({}) for {}", self._version, [r.uid for r in refs])
            try:
                results = self._service.unprepare(refs, deadline=deadline)
                _warn_extra("NodeUnprepareResources", refs, results)
            except Exception as exc:  # noqa: BLE001 - becomes every claim's error, logged with traceback
                errors.update(_call_failed("NodeUnprepareResources", refs, exc))
        response = self._messages.NodeUnprepareResourcesResponse()
        for uid, error in errors.items():
            response.claims[uid].error = error
        for ref in refs:
            if ref.uid in errors:
                continue
            entry = response.claims[ref.uid]
            outcome = results.get(ref.uid)
            if outcome is None:
                entry.error = _missing("NodeUnprepareResources", ref.uid)
            elif outcome:
                entry.error = str(outcome)
                logger.bind(claim=ref.uid).debug(
                    "unprepare failed: {}", outcome
                )  # the service logged it
        return response


class DRAv1Servicer:
    """``k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin``: sets ``share_id`` when a device has one."""

    def __init__(self, service: NodeService) -> None:
        self._impl = _DRAService(service, dra_v1_pb2, share_id=True)

    def NodePrepareResources(
        self, request: dra_v1_pb2.NodePrepareResourcesRequest, context: CallContext
    ) -> dra_v1_pb2.NodePrepareResourcesResponse:
        deadline = answer_by(context.time_remaining())
        response: dra_v1_pb2.NodePrepareResourcesResponse = self._impl.prepare(request, deadline)
        return response

    def NodeUnprepareResources(
        self, request: dra_v1_pb2.NodeUnprepareResourcesRequest, context: CallContext
    ) -> dra_v1_pb2.NodeUnprepareResourcesResponse:
        deadline = answer_by(context.time_remaining())
        response: dra_v1_pb2.NodeUnprepareResourcesResponse = self._impl.unprepare(
            request, deadline
        )
        return response


class DRAv1beta1Servicer:
    """``k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin``: as v1, without ``share_id``."""

    def __init__(self, service: NodeService) -> None:
        self._impl = _DRAService(service, dra_v1beta1_pb2, share_id=False)

    def NodePrepareResources(
        self, request: dra_v1beta1_pb2.NodePrepareResourcesRequest, context: CallContext
    ) -> dra_v1beta1_pb2.NodePrepareResourcesResponse:
        deadline = answer_by(context.time_remaining())
        response: dra_v1beta1_pb2.NodePrepareResourcesResponse = self._impl.prepare(
            request, deadline
        )
        return response

    def NodeUnprepareResources(
        self, request: dra_v1beta1_pb2.NodeUnprepareResourcesRequest, context: CallContext
    ) -> dra_v1beta1_pb2.NodeUnprepareResourcesResponse:
        deadline = answer_by(context.time_remaining())
        response: dra_v1beta1_pb2.NodeUnprepareResourcesResponse = self._impl.unprepare(
            request, deadline
        )
        return response


def add_dra_servicers(server: GrpcServer, service: NodeService) -> None:
    """Serve both DRA API versions, backed by ``service``, on ``server``."""
    server.add_service(dra_v1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"], DRAv1Servicer(service))
    server.add_service(
        dra_v1beta1_pb2.DESCRIPTOR.services_by_name["DRAPlugin"], DRAv1beta1Servicer(service)
    )

"""The validating admission webhook: reject bad opaque configuration when it is written.

The kubelet plugin decodes a claim's opaque configuration only at prepare, when the pod is
already scheduled; a typo then surfaces as a pod stuck in ContainerCreating. This webhook runs
the same decoder (the backend's ``dra_decode_config``, through :class:`~dra_core.plugins.Hooks`)
when a ResourceClaim, ResourceClaimTemplate or DeviceClass is created or updated, so the user
gets the error from ``kubectl apply``.

Endpoints (HTTPS; plain HTTP only when asked for explicitly, for local tests):

* ``POST /validate``: an ``admission.k8s.io/v1`` AdmissionReview in, one out. Every
  ``opaque`` config entry whose ``driver`` is this driver must be a JSON object of at most
  ``LIMITS.opaque_parameters_bytes`` bytes that the backend decodes; the first one that is not
  denies the request with a message naming the object, the entry, the requests it targets and
  the decoder's message. Other drivers' entries are ignored. An UPDATE that leaves the config
  list as it was is allowed (metadata changes, finalizer removal), so an object written before
  the webhook existed can still be cleaned up. A malformed review is answered with HTTP 400,
  and so is JSON that is not UTF-8, nested more than 100 levels deep or with a number of more
  than 100 digits.
* ``GET /healthz``: 200 ``ok``.
* ``GET /metrics``: the Prometheus metrics, including ``dra_webhook_admissions_total``.

Limits (:data:`WEBHOOK_LIMITS`, :mod:`dra_core.httpbase`): a review body of at most
:data:`MAX_REVIEW_BYTES` (413 beyond, 411 without a Content-Length); at most
:data:`MAX_REVIEW_BYTES` of bodies read and decoded at once, so a maximal review is decoded
alone and a burst of large ones waits its turn (up to 10 s, then 503) instead of growing the
process past its memory limit; 10 s for each phase the client controls; 32 connections.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from dra_core import metrics
from dra_core.hookspecs import NodeContext
from dra_core.httpbase import (
    TEXT,
    BackgroundServer,
    ByteBudget,
    ClientGone,
    Handler,
    HttpError,
    HttpLimits,
    JsonLimitError,
    LimitedHTTPServer,
    parse_json,
)
from dra_core.lazylog import logger
from dra_core.model import LIMITS
from dra_core.plugins import HookError, Hooks

__all__ = (
    "ADMISSIONS",
    "MAX_REVIEW_BYTES",
    "WEBHOOK_LIMITS",
    "ReviewError",
    "TlsFiles",
    "Webhook",
    "review",
    "serve",
    "validate_object",
)

#: Larger than any review of an object the API server stores (its request limit is 3 MiB,
#: etcd's 1.5 MiB per object; an UPDATE's review carries the object and the old object).
MAX_REVIEW_BYTES = 4 * 1024 * 1024

#: The webhook's connection limits: the API server calls it with a 5 s timeout.
WEBHOOK_LIMITS = HttpLimits(timeout=10.0, max_connections=32, max_header_bytes=64 * 1024)

ADMISSIONS = Counter(
    "dra_webhook_admissions",
    "Admission reviews answered by the webhook, by object kind and result "
    "(allowed, denied, or error for a malformed review).",
    ["kind", "result"],
    registry=metrics.REGISTRY,
)

#: Where each kind keeps its list of device configs.
_CONFIG_PATHS: dict[str, tuple[str, ...]] = {
    "ResourceClaim": ("spec", "devices", "config"),
    "ResourceClaimTemplate": ("spec", "spec", "devices", "config"),
    "DeviceClass": ("spec", "config"),
}


class ReviewError(ValueError):
    """The AdmissionReview itself is malformed (answered with HTTP 400)."""


def _get(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _describe(kind: str, obj: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = request.get("name") or meta.get("name")
    if not name:
        name = f"{meta.get('generateName') or ''}<generated>"
    namespace = request.get("namespace") or meta.get("namespace")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def validate_object(
    kind: str, obj: Mapping[str, Any], hooks: Hooks, context: NodeContext, *, label: str = ""
) -> str | None:
    """Why ``obj``'s opaque configs for this driver are invalid, or None when they are valid.

    :param kind: ResourceClaim, ResourceClaimTemplate or DeviceClass.
    :param obj: the object as JSON.
    :param label: how to name the object in the message (default: kind and metadata name).
    """
    path = _CONFIG_PATHS[kind]
    label = label or _describe(kind, obj, {})
    field = ".".join(path)
    entries = _get(obj, path)
    if entries is None:
        return None
    if not isinstance(entries, list):
        return f"{label}: {field} is not a list"
    driver = context.driver_name
    for index, entry in enumerate(entries):
        opaque = entry.get("opaque") if isinstance(entry, Mapping) else None
        if not isinstance(opaque, Mapping) or opaque.get("driver") != driver:
            continue  # other drivers' configs are theirs to check
        where = f"{label}: {field}[{index}]"
        if kind != "DeviceClass":
            requests = entry.get("requests") or []
            if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
                return f"{where}.requests is not a list of request names"
            where += f" (requests {', '.join(requests)})" if requests else " (all requests)"
        where += f" for {driver}"
        parameters = opaque.get("parameters")
        if not isinstance(parameters, Mapping):
            kind_of = "null" if parameters is None else type(parameters).__name__
            return f"{where}: opaque.parameters must be a JSON object, not {kind_of}"
        size = len(json.dumps(parameters))  # measured as the kubelet plugin measures it
        if size > LIMITS.opaque_parameters_bytes:
            return (
                f"{where}: opaque.parameters is {size} bytes, over the limit of "
                f"{LIMITS.opaque_parameters_bytes}"
            )
        try:
            hooks.decode_config(parameters, context)
        except HookError as exc:
            return f"{where}: {exc.detail}"  # the backend's words, without the hook's name
    return None


def review(body: object, hooks: Hooks, context: NodeContext) -> tuple[dict[str, Any], str, str]:
    """Answer one AdmissionReview: the response review, the object's kind and the result.

    :raises ReviewError: the review is malformed.
    """
    if not isinstance(body, Mapping):
        msg = "the body is not a JSON object (expected an admission.k8s.io/v1 AdmissionReview)"
        raise ReviewError(msg)
    if body.get("apiVersion") != "admission.k8s.io/v1" or body.get("kind") != "AdmissionReview":
        msg = (
            f"expected apiVersion admission.k8s.io/v1 and kind AdmissionReview, got "
            f"{body.get('apiVersion')!r} {body.get('kind')!r} (set admissionReviewVersions: [v1])"
        )
        raise ReviewError(msg)
    request = body.get("request")
    if not isinstance(request, Mapping):
        msg = "the AdmissionReview has no request object"
        raise ReviewError(msg)
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        msg = "the AdmissionReview's request has no uid"
        raise ReviewError(msg)
    kind = _get(request, ("kind", "kind"))
    obj = request.get("object")
    if not isinstance(kind, str) or kind not in _CONFIG_PATHS:
        kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if not isinstance(kind, str) or kind not in _CONFIG_PATHS:
        msg = (
            f"cannot validate kind {kind!r}: this webhook validates "
            f"{', '.join(_CONFIG_PATHS)} of resource.k8s.io"
        )
        raise ReviewError(msg)
    message: str | None = None
    if request.get("operation") in ("CREATE", "UPDATE"):
        if not isinstance(obj, Mapping):
            msg = f"the {request.get('operation')} request has no object"
            raise ReviewError(msg)
        old = request.get("oldObject")
        path = _CONFIG_PATHS[kind]
        unchanged = isinstance(old, Mapping) and _get(old, path) == _get(obj, path)
        if not unchanged:
            label = _describe(kind, obj, request)
            message = validate_object(kind, obj, hooks, context, label=label)
    response: dict[str, Any] = {"uid": uid, "allowed": message is None}
    if message is not None:
        response["status"] = {"code": 422, "reason": "Invalid", "message": message}
    result = "allowed" if message is None else "denied"
    answer = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    return answer, kind, result


class TlsFiles:
    """A server-side SSL context from a certificate and key file, reloaded when they change.

    cert-manager renews the Secret's files in place; the next connection picks them up.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] | None = None
        self._context = self._load()

    def _mtimes(self) -> tuple[float, float]:
        return (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime)

    def _load(self) -> ssl.SSLContext:
        stamp = self._mtimes()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp
        return context

    def context(self) -> ssl.SSLContext:
        """The current context; a changed pair of files is loaded, a broken one logged."""
        with self._lock:
            try:
                if self._mtimes() != self._stamp:
                    self._context = self._load()
                    logger.info("reloaded the TLS certificate {}", self.cert_file)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("cannot reload the TLS certificate, keeping the old one: {}", exc)
            return self._context


class _Server(LimitedHTTPServer):
    tls: TlsFiles | None = None

    def wrap(self, request: Any) -> Any:
        if self.tls is None:
            return request
        # The handshake runs in open_connection, in the request's thread and under the
        # client's deadline: a slow TLS client never blocks accept() nor holds a thread forever.
        return self.tls.context().wrap_socket(
            request, server_side=True, do_handshake_on_connect=False
        )

    def open_connection(self, conn: Any) -> None:
        if self.tls is not None:
            conn.do_handshake()


class Webhook(BackgroundServer):
    """Serves ``/validate``, ``/healthz`` and ``/metrics`` on a background thread."""

    def __init__(
        self,
        hooks: Hooks,
        driver_name: str,
        *,
        host: str = "0.0.0.0",  # called from outside the pod, by the API server
        port: int = 8443,
        tls: TlsFiles | None = None,
        limits: HttpLimits = WEBHOOK_LIMITS,
        max_review_bytes: int = MAX_REVIEW_BYTES,
        max_inflight_bytes: int = MAX_REVIEW_BYTES,
    ) -> None:
        """:param max_review_bytes: the largest review body accepted (413 beyond).
        :param max_inflight_bytes: review bytes read and decoded at once; the memory a review
            takes grows with its size (up to about 25 times for JSON made of empty objects),
            so this bounds the process's memory under concurrent large reviews.
        """
        self.hooks = hooks
        self.context = NodeContext(node_name="", driver_name=driver_name)
        self.tls = tls
        self.max_review_bytes = max_review_bytes
        self.budget = ByteBudget(max_inflight_bytes)
        webhook = self

        class WebhookHandler(Handler):
            def do_GET(self) -> None:  # the http.server API names it
                self.received()
                if self.path == "/healthz":
                    self.send_text(200, "ok")
                elif self.path == "/metrics":
                    self.send_body(200, metrics.CONTENT_TYPE, metrics.render())
                else:
                    self.send_text(404, "not found")

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != "/validate":
                    self.received()
                    self.send_text(404, "not found")
                    return
                try:
                    length = self.content_length(webhook.max_review_bytes)
                except HttpError as exc:
                    self._refused(exc.status, exc.message)
                    if exc.status == 413:
                        self.refuse_body(exc.status, exc.message, exc.declared)
                    else:
                        self.send_text(exc.status, exc.message)
                    return
                try:
                    with webhook.budget.hold(length, self.server.limits.timeout) as ok:
                        if not ok:
                            self.received()
                            self._refused(503, "too many large reviews at once")
                            self.send_text(503, "too many large reviews at once, try again")
                            return
                        status, content_type, answer = self._answer(length)
                except ClientGone as exc:
                    logger.debug("webhook: {} left: {}", self.client_address[0], exc)
                    self.close_connection = True
                    return
                self.send_body(status, content_type, answer)

            def _refused(self, status: int, message: str) -> None:
                ADMISSIONS.labels(kind="", result="error").inc()
                logger.warning(
                    "webhook: refused a request from {} ({}): {}",
                    self.client_address[0],
                    status,
                    message,
                )

            def _answer(self, length: int) -> tuple[int, str, bytes]:
                """Read, decode and review the body: the status and body of the answer.

                Returns bytes only, so the decoded review is freed before the budget is.
                """
                raw = self.read_body(length)
                try:
                    try:
                        body = parse_json(raw)
                    except JsonLimitError as exc:
                        raise ReviewError(str(exc)) from None
                    del raw
                    answer, kind, result = review(body, webhook.hooks, webhook.context)
                except ReviewError as exc:
                    ADMISSIONS.labels(kind="", result="error").inc()
                    logger.warning("webhook: bad request from {}: {}", self.client_address[0], exc)
                    return 400, TEXT, f"{exc}\n".encode()
                except Exception as exc:  # noqa: BLE001 - a bug here must not take the server down
                    ADMISSIONS.labels(kind="", result="error").inc()
                    logger.opt(exception=exc).error("webhook: review failed")
                    return 500, TEXT, f"internal error: {exc}\n".encode()
                ADMISSIONS.labels(kind=kind, result=result).inc()
                message = answer["response"].get("status", {}).get("message")
                if message:
                    logger.info("webhook: denied: {}", message)
                return 200, "application/json", json.dumps(answer).encode()

        server = _Server((host, port), WebhookHandler, limits, name="webhook")
        server.tls = tls
        if tls is not None:
            server.refusal = None  # a TLS client cannot read a plain-text 503
        super().__init__(server, "dra-webhook")

    def start(self) -> None:
        super().start()
        scheme = "https" if self.tls is not None else "http (insecure)"
        logger.info(
            "admission webhook for driver {} on {} port {} ({})",
            self.context.driver_name,
            self.host,
            self.port,
            scheme,
        )


def serve(webhook: Webhook) -> None:
    """Run ``webhook`` until SIGTERM or SIGINT."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    webhook.start()
    try:
        stop.wait()
    finally:
        webhook.stop()
    logger.info("admission webhook stopped")

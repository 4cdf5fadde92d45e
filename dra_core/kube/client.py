"""API client setup and raw JSON requests.

The kubernetes package costs about half a second to import, so it is imported here, on first
use, and never by the modules the start-up path needs before the API is used.

Every request goes through the client's `TokenBucket` (a bounded rate with bursts, as
client-go's QPS/burst) and is counted by Kubernetes verb and resource in `KubeClient.requests`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from dra_core.kube.ratelimit import DEFAULT_BURST, DEFAULT_QPS, TokenBucket, seconds_left

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

__all__ = (
    "BURST_ENV",
    "QPS_ENV",
    "ApiError",
    "KubeClient",
    "load_client",
    "parse_retry_after",
    "request_verb",
)

#: Environment variables overriding the client-side request rate (requests a second, and the
#: burst); a QPS of 0 disables the limit.
QPS_ENV = "DRA_KUBE_API_QPS"
BURST_ENV = "DRA_KUBE_API_BURST"
#: The shortest time a request bounded by its caller's deadline is given.
_MIN_REQUEST_SECONDS = 0.05


class ApiError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(
        self, method: str, path: str, status: int, message: str, retry_after: float | None = None
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.retry_after = retry_after
        where = "API server unreachable" if status == 0 else f"HTTP {status}"
        super().__init__(f"{method} {path}: {where}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def retriable(self) -> bool:
        """Connection errors, throttling and server errors are worth another try."""
        return self.status == 0 or self.status == 429 or self.status >= 500


def request_verb(method: str, path: str, *, watch: bool = False) -> str:
    """The Kubernetes verb of a request: get, list, watch, create, update, patch, delete."""
    if watch:
        return "watch"
    method = method.upper()
    if method != "GET":
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, method.lower()
        )
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    return "list" if len(rest) == 1 else "get"


def _resource_of(path: str) -> str:
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    return rest[0] if rest else ""


@dataclass
class KubeClient:
    """A thin JSON client over ``kubernetes.client.ApiClient``.

    ``limiter`` paces every request (watches included), as client-go does; None sends them
    unpaced. ``requests`` counts the requests sent, by (verb, resource), e.g.
    ``("list", "resourceslices")``, failed ones included.
    """

    api: ApiClient
    #: Seconds one request may take; the kubelet gives a whole prepare call 45 s.
    timeout: float = 10.0
    limiter: TokenBucket | None = None
    requests: Counter[tuple[str, str]] = field(default_factory=Counter, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def requests_by_verb(self) -> dict[str, int]:
        """The requests sent so far, summed by verb."""
        totals: Counter[str] = Counter()
        with self._count_lock:
            for (verb, _), n in self.requests.items():
                totals[verb] += n
        return dict(totals)

    def request_count(self, verb: str | None = None, resource: str | None = None) -> int:
        """Requests sent so far with this verb and/or resource (None: any)."""
        with self._count_lock:
            return sum(
                n
                for (v, r), n in self.requests.items()
                if (verb is None or v == verb) and (resource is None or r == resource)
            )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON response (None for an empty body)."""
        response = self._send(
            method,
            path,
            body=body,
            query=query,
            content_type=content_type,
            timeout=self.timeout if timeout is None else timeout,
        )
        raw = response.read()
        return json.loads(raw) if raw else None

    def stream(self, path: str, query: Mapping[str, str], *, read_timeout: float) -> Any:
        """Start a streaming GET (a watch) and return the open urllib3 response, unread."""
        return self._send(
            "GET", path, query=query, timeout=(self.timeout, read_timeout), stream=True
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float],
        stream: bool = False,
    ) -> Any:
        """The response of a 2xx request; ApiError for any other status or no connection."""
        from urllib3.exceptions import HTTPError  # slow import, kept off start-up

        if self.limiter is not None:
            self.limiter.acquire()
        left = seconds_left()
        if left is not None and isinstance(timeout, int | float):
            # The wait for a token may have used part of the caller's time: what is left bounds
            # the request (never below a floor that lets a near-instant answer arrive).
            timeout = min(timeout, max(left, _MIN_REQUEST_SECONDS))
        key = (request_verb(method, path, watch=stream), _resource_of(path))
        with self._count_lock:
            self.requests[key] += 1
        api = self.api
        try:
            _, url, headers, data, post = api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list((query or {}).items()) or None,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
            )
            # The kubernetes client hands back the urllib3 response unread.
            response = api.call_api(
                method,
                url,
                header_params=headers,
                body=data,
                post_params=post,
                _request_timeout=timeout,
            )
        except (HTTPError, OSError) as exc:
            raise ApiError(method, path, 0, str(exc)) from None
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise _api_error(
                method,
                path,
                int(status or 0),
                getattr(exc, "body", None),
                getattr(exc, "reason", ""),
                getattr(exc, "headers", None),
            ) from None
        if not 200 <= response.status < 300:
            raw = response.read()
            raise _api_error(method, path, response.status, raw, response.reason, response.headers)
        return response.response if stream else response

    def get(
        self, path: str, query: Mapping[str, str] | None = None, *, timeout: float | None = None
    ) -> Any:
        """GET ``path``; ``timeout`` (seconds) replaces the client's for this request."""
        return self.request("GET", path, query=query, timeout=timeout)


def _api_error(
    method: str,
    path: str,
    status: int,
    body: Any,
    reason: str | None,
    headers: Mapping[str, str] | None,
) -> ApiError:
    """An ApiError with the message of the API server's Status object, if it sent one."""
    message = reason or ""
    try:
        status_obj = json.loads(body or b"{}")
        message = status_obj.get("message") or message
    except (ValueError, AttributeError, TypeError):
        pass
    value = (headers or {}).get("Retry-After")
    return ApiError(method, path, status, message, parse_retry_after(value))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        msg = f"{name} must be a number, got {raw!r}"
        raise ValueError(msg) from None


def load_client(
    kubeconfig: str | None = None,
    *,
    timeout: float = 10.0,
    qps: float | None = None,
    burst: int | None = None,
) -> KubeClient:
    """A client from ``kubeconfig``, else ``$KUBECONFIG``, else the in-cluster service account.

    Requests are paced at ``qps`` a second with bursts of ``burst`` (default: ``$DRA_KUBE_API_QPS``
    and ``$DRA_KUBE_API_BURST``, else 50 and 100, the kubelet's own defaults); a ``qps`` of 0
    disables the limit.
    """
    from kubernetes import client, config  # slow import, kept off start-up

    rate = _env_number(QPS_ENV, DEFAULT_QPS) if qps is None else qps
    size = int(_env_number(BURST_ENV, DEFAULT_BURST)) if burst is None else burst
    limiter = TokenBucket(rate, size) if rate > 0 else None

    path = kubeconfig or os.environ.get("KUBECONFIG")
    configuration = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    configuration.retries = 0  # retries are ours, with backoff and Retry-After
    return KubeClient(client.ApiClient(configuration), timeout=timeout, limiter=limiter)

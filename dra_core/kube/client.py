"""API client setup and raw JSON requests.

The kubernetes package loads the kubeconfig or the in-cluster service account and sets up the
connection pool (TLS, client certificate, proxy); requests go through that pool with urllib3
directly, named ``dra-core/<version>`` to the API server (its audit log, its metrics by client).

The kubernetes package costs about half a second to import, so it is imported here, on first
use, and never by the modules the start-up path needs before the API is used.

Every request goes through the client's `TokenBucket` (a bounded rate with bursts, as
client-go's QPS/burst) and is counted by Kubernetes verb and resource in `KubeClient.requests`.

Connections: HTTP/1.1 carries one request at a time per connection, and a watch is a response
that never ends, so the requests an agent sends while its watch streams take a second
connection (client-go has the one connection only because it speaks HTTP/2 to the API server
and multiplexes the watch and the requests as streams). That second connection is kept for the
next request (a burst of prepares), and closed once no request has been sent for
``idle_timeout`` (`IdleCloser`), so that at rest an agent holds only its watch's connection.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from dra_core._version import __version__
from dra_core.kube.ratelimit import (
    BURST_ENV,
    DEFAULT_BURST,
    DEFAULT_QPS,
    QPS_ENV,
    TokenBucket,
    seconds_left,
)

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

__all__ = (
    "IDLE_CONNECTION_SECONDS",
    "ApiError",
    "IdleCloser",
    "KubeClient",
    "close_idle_connections",
    "load_client",
    "parse_retry_after",
    "request_verb",
)

#: How the agent names itself to the API server (its audit log, its metrics by client).
USER_AGENT = f"dra-core/{__version__}"
#: The shortest time a request bounded by its caller's deadline is given.
_MIN_REQUEST_SECONDS = 0.05
#: Seconds a pooled connection may stay unused before it is closed (shorter than the API
#: server's own 90 s, so the client closes it rather than finding it closed).
IDLE_CONNECTION_SECONDS = 30.0


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


class IdleCloser:
    """Calls ``close`` once no request has been in flight for ``seconds``.

    A thread of its own starts with the first request; it waits without a timeout while nothing
    is to be closed, so an agent at rest wakes for nothing. Closing while a request starts is
    harmless: `close_idle_connections` only closes connections that sit in the pool, and a
    closed one is reopened by its next request.
    """

    def __init__(self, close: Callable[[], None], seconds: float) -> None:
        self._close = close
        self._seconds = seconds
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_used = 0.0
        self._used = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark a request in flight for the duration of the block."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_used = time.monotonic()
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="kube-idle-connections", daemon=True
                    )
                    self._thread.start()
            self._used.set()

    def _run(self) -> None:
        while True:
            self._used.wait()
            self._used.clear()
            while True:
                with self._lock:
                    left = self._last_used + self._seconds - time.monotonic()
                    busy = self._in_flight > 0
                if busy:  # the request in flight marks the client used when it ends
                    break
                if left <= 0:
                    self._close()
                    break
                time.sleep(left)


def close_idle_connections(api: ApiClient) -> None:
    """Close the connections of ``api`` that sit unused in its pools; those in use (a watch's,
    a request's) are not touched, and a closed one is reopened by the request that takes it."""
    pools = api.rest_client.pool_manager.pools
    for key in list(pools.keys()):
        pool = pools.get(key)
        queue = getattr(pool, "pool", None)  # urllib3's LifoQueue of idle connections
        if queue is None:
            continue
        with queue.mutex:
            for conn in queue.queue:
                if conn is not None:
                    conn.close()


@dataclass
class KubeClient:
    """A thin JSON client: the credentials and connection pool of a
    ``kubernetes.client.ApiClient``, requests sent straight through that pool with urllib3.

    ``limiter`` paces every request (watches included), as client-go does; None sends them
    unpaced. ``requests`` counts the requests sent, by (verb, resource), e.g.
    ``("list", "resourceslices")``, failed ones included. Connections unused for
    ``idle_timeout`` seconds are closed (None keeps them).
    """

    api: ApiClient
    #: Seconds one request may take; the kubelet gives a whole prepare call 45 s.
    timeout: float = 10.0
    limiter: TokenBucket | None = None
    idle_timeout: float | None = IDLE_CONNECTION_SECONDS
    requests: Counter[tuple[str, str]] = field(default_factory=Counter, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _idle: IdleCloser | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.idle_timeout is not None:
            api = self.api
            self._idle = IdleCloser(lambda: close_idle_connections(api), self.idle_timeout)

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
        with self._in_use():
            response = self._send(
                method,
                path,
                body=body,
                query=query,
                content_type=content_type,
                timeout=self.timeout if timeout is None else timeout,
            )
            raw = response.data
        return json.loads(raw) if raw else None

    def stream(self, path: str, query: Mapping[str, str], *, read_timeout: float) -> Any:
        """Start a streaming GET (a watch) and return the open urllib3 response, unread."""
        with self._in_use():  # until the response starts; then the stream holds its connection
            return self._send(
                "GET", path, query=query, timeout=(self.timeout, read_timeout), stream=True
            )

    def _in_use(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self._idle is None else self._idle.in_use()

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
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        headers.update(self._credentials())
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        url = self.api.configuration.host + path
        if query:
            url += "?" + urlencode(query)
        try:
            # Straight to urllib3's pool, which the kubernetes client set up from the
            # configuration (TLS, client certificate, proxy): its own request path adds work
            # to every request. No retries here: the callers' back off and honour Retry-After.
            response = self.api.rest_client.pool_manager.urlopen(
                method,
                url,
                body=data,
                headers=headers,
                timeout=_timeout(timeout),
                retries=False,
                redirect=False,
                preload_content=False,
            )
        except (HTTPError, OSError) as exc:
            raise ApiError(method, path, 0, str(exc)) from None
        if not 200 <= response.status < 300:
            raise _api_error(
                method, path, response.status, response.data, response.reason, response.headers
            )
        return response

    def _credentials(self) -> dict[str, str]:
        """The request's authorization header: the configuration's bearer token, refreshed by
        its hook (which `load_client` limits to one run a second); none with a client
        certificate alone."""
        settings = self.api.configuration.auth_settings().get("BearerToken")
        if not settings or not settings.get("value"):
            return {}
        return {settings["key"]: settings["value"]}

    def get(
        self, path: str, query: Mapping[str, str] | None = None, *, timeout: float | None = None
    ) -> Any:
        """GET ``path``; ``timeout`` (seconds) replaces the client's for this request."""
        return self.request("GET", path, query=query, timeout=timeout)


def _timeout(seconds: float | tuple[float, float]) -> Any:
    """urllib3's timeout: in all, or (to connect, between reads) for a stream."""
    from urllib3 import Timeout

    if isinstance(seconds, tuple):
        return Timeout(connect=seconds[0], read=seconds[1])
    return Timeout(total=seconds)


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
    _refresh_at_most_every(configuration, _REFRESH_SECONDS)
    return KubeClient(client.ApiClient(configuration), timeout=timeout, limiter=limiter)


#: How often the token refresh hook of a kubeconfig or in-cluster configuration may run.
_REFRESH_SECONDS = 1.0


def _refresh_at_most_every(configuration: Any, seconds: float) -> None:
    """Run the configuration's token refresh hook at most once every ``seconds``.

    The hooks of the kubernetes client re-apply the whole configuration at each request (the
    host, which reads the proxy environment again): a third of the CPU of reading a claim. They
    refresh tokens well before they expire (in-cluster: every minute; kubeconfig: five minutes
    before the expiry), so a second later changes nothing.
    """
    hook = configuration.refresh_api_key_hook
    if hook is None:
        return
    last = -math.inf
    lock = threading.Lock()

    def refresh(target: Any) -> None:
        nonlocal hook, last
        now = time.monotonic()
        with lock:
            if now - last < seconds:
                return
            last = now
        hook(target)
        if target.refresh_api_key_hook is not refresh:  # the hook installs itself again
            hook = target.refresh_api_key_hook
            target.refresh_api_key_hook = refresh

    configuration.refresh_api_key_hook = refresh

"""The client-side rate limit and Retry-After, against a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client as k8s

from dra_core.kube.client import ApiError, KubeClient, load_client, parse_retry_after
from dra_core.kube.ratelimit import DEFAULT_BURST, DEFAULT_QPS, TokenBucket
from dra_core.kube.retry import Backoff, call_with_retries

NODE = "/api/v1/nodes/n1"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        #: Seconds (monotonic) at which each request arrived.
        self.arrivals: list[float] = []
        #: Responses to give before answering 200: (status, Retry-After header or None).
        self.script: list[tuple[int, str | None]] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.arrivals.append(time.monotonic())
            status, retry_after = self.server.script.pop(0) if self.server.script else (200, None)
        body = json.dumps(
            {"kind": "Node", "metadata": {"name": "n1"}}
            if status == 200
            else {"kind": "Status", "message": "slow down", "code": status}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_client(server: Server, limiter: TokenBucket | None = None) -> KubeClient:
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    configuration.retries = 0
    return KubeClient(k8s.ApiClient(configuration), timeout=5.0, limiter=limiter)


def test_requests_paced_after_the_burst(server):
    kube = make_client(server, TokenBucket(qps=20, burst=5))
    started = time.monotonic()
    for _ in range(15):
        kube.get(NODE)
    elapsed = time.monotonic() - started
    # 5 at once, then 10 more at 20 a second: 0.5 s.
    assert 0.45 <= elapsed < 2.0
    gaps = [b - a for a, b in zip(server.arrivals[5:], server.arrivals[6:], strict=False)]
    assert min(gaps) >= 0.035  # 0.05 s apart when sent; arrival times jitter on a busy machine
    assert kube.requests_by_verb() == {"get": 15}


def test_parallel_callers_share_the_rate(server):
    kube = make_client(server, TokenBucket(qps=40, burst=4))
    threads = [
        threading.Thread(target=lambda: [kube.get(NODE) for _ in range(6)]) for _ in range(4)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert len(server.arrivals) == 24
    assert elapsed >= (24 - 4) / 40 * 0.9  # 0.5 s, whatever the number of threads


def test_burst_refills_when_quiet():
    now = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(qps=10, burst=3, clock=lambda: now[0], sleep=slept.append)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.1)
    assert bucket.reserve() == pytest.approx(0.2)  # queued behind the previous one
    now[0] += 10.0
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]  # full again, not more
    assert bucket.reserve() == pytest.approx(0.1)
    assert TokenBucket(qps=0, burst=0).reserve() == 0.0  # disabled
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(qps=5, burst=0)


def test_429_retry_after_honoured(server):
    server.script = [(429, "1")]
    kube = make_client(server)
    started = time.monotonic()
    node = call_with_retries(lambda: kube.get(NODE), what="get Node", attempts=3)
    elapsed = time.monotonic() - started
    assert node["metadata"]["name"] == "n1"
    assert len(server.arrivals) == 2
    # The default first delay is 0.2 s; the server asked for 1 s.
    assert server.arrivals[1] - server.arrivals[0] >= 0.95
    assert elapsed < 3.0


def test_503_retry_after_as_http_date(server):
    server.script = [(503, formatdate(time.time() + 2, usegmt=True))]
    kube = make_client(server)
    with pytest.raises(ApiError) as caught:
        kube.get(NODE)
    assert caught.value.status == 503 and caught.value.retriable
    assert 0.5 <= (caught.value.retry_after or 0) <= 2.0
    node = call_with_retries(lambda: kube.get(NODE), what="get Node", attempts=2)
    assert node["metadata"]["name"] == "n1"


def test_retry_after_capped_and_without_header_backoff_used(server):
    server.script = [(429, "3600"), (429, None)]
    kube = make_client(server)
    waits: list[float] = []
    backoff = Backoff(delays=(0.05,), cap=0.3)
    call_with_retries(
        lambda: kube.get(NODE), what="get Node", attempts=3, backoff=backoff, sleep=waits.append
    )
    assert waits == [0.3, 0.05]


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_load_client_rate_from_environment(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    default = load_client(str(kubeconfig))
    assert default.limiter is not None
    assert (default.limiter.qps, default.limiter.burst) == (DEFAULT_QPS, DEFAULT_BURST)
    monkeypatch.setenv("DRA_KUBE_API_QPS", "200")
    monkeypatch.setenv("DRA_KUBE_API_BURST", "400")
    tuned = load_client(str(kubeconfig))
    assert tuned.limiter is not None and (tuned.limiter.qps, tuned.limiter.burst) == (200, 400)
    monkeypatch.setenv("DRA_KUBE_API_QPS", "0")
    assert load_client(str(kubeconfig)).limiter is None
    assert load_client(str(kubeconfig), qps=7, burst=9).limiter is not None


def test_a_request_after_a_token_wait_is_bounded_by_what_the_deadline_leaves():
    """The wait for a token uses part of the caller's time; the request gets only the rest."""
    import socket

    from dra_core.kube.ratelimit import waits_end_by

    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        configuration = k8s.Configuration()
        configuration.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        configuration.retries = 0  # as load_client sets it
        api = KubeClient(k8s.ApiClient(configuration), timeout=5.0, limiter=TokenBucket(2.0, 1))
        api.limiter.reserve()  # the next token comes in 0.5 s
        started = time.monotonic()
        with waits_end_by(started + 1.5), pytest.raises(ApiError):
            api.get(NODE, timeout=1.5)  # the caller's budget, computed before the token wait
        assert time.monotonic() - started < 1.9, "the request outlived the caller's deadline"
    finally:
        silent.close()

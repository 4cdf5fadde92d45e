"""The liveness and metrics endpoint over real HTTP, probing the real plugin sockets, and its
limits against real clients on real sockets: idle and trickling connections are cut, handler
threads stay bounded, extra connections are refused, headers are bounded, and the server
listens only on the address it is given."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from dra_core import metrics
from dra_core.httpbase import HttpLimits
from dra_core.httpserver import STATUS_LIMITS, StatusServer


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def serving(limits: HttpLimits, probe=lambda: [], host: str = "127.0.0.1"):
    server = StatusServer(host, 0, probe=probe, limits=limits)
    server.start()
    try:
        assert get(server.port, "/healthz", host)[0] in (200, 503)  # serving, threads started
        yield server
    finally:
        server.stop()


def idle_connection(port: int) -> socket.socket:
    """A connection that never sends a byte (connected without blocking the test)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
    return sock


def wait_closed_by_server(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """Wait until the server has closed every socket (end of stream or reset, after whatever
    it sent); return those still open after ``within`` seconds."""
    still = list(socks)
    deadline = time.monotonic() + within
    while still and time.monotonic() < deadline:
        readable, _, _ = select.select(still, [], [], 0.5)
        for sock in readable:
            try:
                if sock.recv(65536):
                    continue  # an answer (a refusal); the end of stream follows
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset: closed too
            still.remove(sock)
    return still


def test_healthz_follows_the_sockets_and_metrics_are_served(make_plugin):
    plugin = make_plugin()
    server = StatusServer("127.0.0.1", 0, probe=plugin.probe)
    server.start()
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        metrics.PREPARED_CLAIMS.set(3)
        status, text = get(server.port, "/metrics")
        assert status == 200 and "dra_prepared_claims 3.0" in text
        assert get(server.port, "/nonesuch")[0] == 404
        plugin.stop()
        status, text = get(server.port, "/healthz")
        assert status == 503
        assert "sock" in text, "the failing socket is named"
    finally:
        server.stop()


def test_default_limits_are_the_documented_ones():
    assert (STATUS_LIMITS.timeout, STATUS_LIMITS.max_connections) == (10.0, 16)
    assert STATUS_LIMITS.max_header_bytes == 16 * 1024


def test_idle_connections_are_cut_and_threads_stay_bounded():
    """Forty connections that never send a request: never more handler threads than
    connection slots, every one closed by the server, and the endpoint still answers (before
    the limits, each idle connection held a thread until the client left)."""
    limits = HttpLimits(timeout=1.0, max_connections=4)
    with serving(limits) as server:
        baseline = threading.active_count()
        socks = [idle_connection(server.port) for _ in range(40)]
        try:
            peak = 0
            until = time.monotonic() + 3
            while time.monotonic() < until:
                peak = max(peak, threading.active_count() - baseline)
                assert server.server.active <= limits.max_connections
                time.sleep(0.02)
            assert peak <= limits.max_connections
            assert wait_closed_by_server(socks, within=180) == []
        finally:
            for sock in socks:
                sock.close()
        assert server.server.timed_out >= 1
        assert get(server.port, "/healthz") == (200, "ok\n")
        # The handler leaves its slot just after the answer reaches the client.
        settled = time.monotonic() + 5
        while server.server.active > 0 and time.monotonic() < settled:
            time.sleep(0.01)
        assert server.server.active == 0


def test_a_trickling_client_is_cut_at_its_deadline():
    """A client that sends a header byte every 50 ms never trips a per-read timeout; the
    deadline (1 s for request line and headers together) cuts it anyway."""
    limits = HttpLimits(timeout=1.0, max_connections=4)
    with serving(limits) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n")
            sent = 0
            cut = False
            for _ in range(1200):  # up to a minute
                try:
                    sock.sendall(b"X-Slow: 1\r\n"[sent % 11 : sent % 11 + 1])
                except OSError:
                    cut = True
                    break
                sent += 1
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    try:
                        cut = sock.recv(65536) == b""
                    except OSError:
                        cut = True
                    if cut:
                        break
            assert cut, f"still connected after {sent} header bytes"
        finally:
            sock.close()
        assert server.server.timed_out == 1
        assert get(server.port, "/healthz") == (200, "ok\n")


def test_connections_beyond_the_limit_are_refused_and_the_server_recovers():
    """Two slots held by requests the server is working on (a slow probe): a third client
    waits its turn for ``timeout`` and is answered 503; once the probes return, all is well."""
    release = threading.Event()
    entered = threading.Semaphore(0)
    first = threading.Event()

    def probe() -> list[str]:
        if not first.is_set():  # the check in serving() itself
            first.set()
            return []
        entered.release()
        release.wait(60)
        return []

    limits = HttpLimits(timeout=1.0, max_connections=2)
    with serving(limits, probe=probe) as server:
        answers: list[tuple[int, str]] = []
        clients = [
            threading.Thread(target=lambda: answers.append(get(server.port, "/healthz")))
            for _ in range(2)
        ]
        for client in clients:
            client.start()
        try:
            for _ in range(2):
                assert entered.acquire(timeout=30)
            assert server.server.active == 2
            assert get(server.port, "/healthz") == (503, "too many connections, try again\n")
            assert server.server.refused == 1
        finally:
            release.set()
            for client in clients:
                client.join(30)
        assert answers == [(200, "ok\n"), (200, "ok\n")]
        assert get(server.port, "/healthz") == (200, "ok\n")


def test_header_bytes_are_bounded():
    limits = HttpLimits(timeout=5.0, max_connections=4, max_header_bytes=1024)
    with serving(limits) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.0\r\n"
                + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(20))
                + b"\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:80]
        # Headers within the budget are fine.
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/healthz", headers={"X-Filler": "a" * 500}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


def test_listens_only_on_the_given_address():
    """Bound to 127.0.0.2 (the DaemonSet binds the pod IP the same way), it is not reachable
    on 127.0.0.1."""
    limits = HttpLimits(timeout=2.0, max_connections=4)
    try:
        server = StatusServer("127.0.0.2", 0, probe=lambda: [], limits=limits)
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2 here: {exc}")
    server.start()
    try:
        assert server.host == "127.0.0.2"
        assert get(server.port, "/healthz", "127.0.0.2") == (200, "ok\n")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    finally:
        server.stop()


def test_an_ipv6_address_is_served():
    try:
        server = StatusServer("::1", 0, probe=lambda: [], limits=STATUS_LIMITS)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server.start()
    try:
        assert get(server.port, "/healthz", "::1") == (200, "ok\n")
    finally:
        server.stop()


def test_run_takes_the_address_from_a_flag_or_the_environment(monkeypatch, capsys):
    from dra_core.cli import _build_parser

    monkeypatch.delenv("DRA_HTTP_HOST", raising=False)
    assert _build_parser().parse_args(["run"]).http_host == "0.0.0.0"
    args = _build_parser().parse_args(["run", "--http-host", "10.1.2.3"])
    assert args.http_host == "10.1.2.3"
    monkeypatch.setenv("DRA_HTTP_HOST", "fd00::7")
    assert _build_parser().parse_args(["run"]).http_host == "fd00::7"
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--http-host HTTP_HOST" in text
    assert "env DRA_HTTP_HOST" in text and "status.podIP" in text

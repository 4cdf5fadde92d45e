"""The admission webhook's limits, against its real listening socket: body size (413, 411),
JSON depth and number size (400 with a clear message, never 500), the TLS handshake deadline,
and the memory of the real ``dra-core webhook`` process under concurrent large reviews."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection, HTTPSConnection
from pathlib import Path

import pytest
import yaml

from dra_core.httpbase import MAX_JSON_DEPTH, MAX_JSON_NUMBER_DIGITS, HttpLimits
from dra_core.webhook import MAX_REVIEW_BYTES, WEBHOOK_LIMITS, TlsFiles, Webhook
from tests.test_webhook import DRIVER, GOOD, admission_review, claim, opaque, post, self_signed

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "webhook" / "deployment.yaml"


@pytest.fixture(scope="module")
def hooks():
    from dra_core import plugins

    return plugins.load("fake")


@pytest.fixture
def server(hooks):
    webhook = Webhook(hooks, DRIVER, host="127.0.0.1", port=0)
    webhook.start()
    try:
        yield webhook
    finally:
        webhook.stop()


def raw_exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` and ``body`` on a plain socket (the body from a thread, as a client that
    does not wait for an early answer would) and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sender = threading.Thread(target=_send_quietly, args=(sock, body))
        sender.start()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        sender.join(60)
    return answer


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def nested(depth: int) -> object:
    value: object = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# ------------------------------------------------------------------ bodies
def test_default_limits_are_the_documented_ones():
    assert MAX_REVIEW_BYTES == 4 * 1024 * 1024
    assert (WEBHOOK_LIMITS.timeout, WEBHOOK_LIMITS.max_connections) == (10.0, 32)
    assert (MAX_JSON_DEPTH, MAX_JSON_NUMBER_DIGITS) == (100, 100)


def test_an_oversized_body_is_refused_with_413_before_it_is_read(server):
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/validate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_REVIEW_BYTES + 1))
        conn.endheaders()  # and no body: the answer must not wait for it
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 413
    assert f"the request body is {MAX_REVIEW_BYTES + 1} bytes" in text
    assert f"over the limit of {MAX_REVIEW_BYTES}" in text


def test_a_client_that_sends_the_oversized_body_anyway_gets_the_413(server):
    size = MAX_REVIEW_BYTES + 1024 * 1024
    head = (
        b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    answer = raw_exchange(server.port, head, b" " * size)
    assert answer.startswith(b"HTTP/1.0 413 "), answer[:100]
    assert b"over the limit" in answer
    assert post(server, admission_review(claim([opaque(GOOD)])))[0] == 200


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        (b"", 411, b"Content-Length header is required"),
        (b"Transfer-Encoding: chunked\r\n", 411, b"no Transfer-Encoding"),
        (b"Content-Length: 12abc\r\n", 400, b"bad Content-Length"),
    ],
)
def test_a_body_without_a_usable_length_is_refused(server, headers, status, expected):
    head = b"POST /validate HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    answer = raw_exchange(server.port, head)
    assert answer.startswith(b"HTTP/1.0 %d " % status), answer[:100]
    assert expected in answer


def test_a_client_that_stops_sending_its_body_is_cut(hooks):
    webhook = Webhook(
        hooks, DRIVER, host="127.0.0.1", port=0, limits=HttpLimits(timeout=1.0, max_connections=4)
    )
    webhook.start()
    try:
        with socket.create_connection(("127.0.0.1", webhook.port), timeout=60) as sock:
            sock.sendall(b"POST /validate HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{")
            readable, _, _ = select.select([sock], [], [], 60)
            assert readable
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(65536) == b""  # closed without an answer
        assert webhook.server.timed_out == 1  # type: ignore[attr-defined]
        assert post(webhook, admission_review(claim([opaque(GOOD)])))[0] == 200
        assert webhook.budget.used == 0
    finally:
        webhook.stop()


# ------------------------------------------------------------------ JSON depth and numbers
def test_deeply_nested_json_is_a_400(server):
    status, text = post(server, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400
    assert "the JSON is nested 100000 levels deep, over the limit of 100" in text.decode()


def test_deep_opaque_parameters_are_a_400_not_a_500(server):
    review = admission_review(claim([opaque({**GOOD, "extra": nested(150)})]))
    status, text = post(server, review)
    assert status == 400
    assert "over the limit of 100" in text.decode()
    # Below the limit the review is answered (here: denied for the unknown field).
    review = admission_review(claim([opaque({**GOOD, "extra": nested(60)})]))
    status, text = post(server, review)
    assert status == 200
    assert json.loads(text)["response"]["allowed"] is False


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("9" * 5000, "a number of 5000 digits, over the limit of 100"),
        ("-" + "1" * 101, "a number of 101 digits"),
        ("0." + "1" * 200, "a number of 201 digits"),
        ("1e" + "9" * 150, "a number of 151 digits"),
        ("1e999", "the number 1e999 is out of range"),
        ("NaN", "NaN is not a JSON value"),
        ("-Infinity", "-Infinity is not a JSON value"),
    ],
)
def test_huge_or_non_finite_numbers_are_a_400(server, number, expected):
    text = json.dumps(admission_review(claim([opaque(GOOD)])))
    body = text.replace('"GREETING": "hi"', f'"GREETING": {number}').encode()
    assert body != text.encode()
    status, answer = post(server, body)
    assert status == 400
    assert expected in answer.decode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # An unterminated string of escaped quotes: a string pattern that can fail rescans
        # from every later quote, which takes hours for 4 MiB.
        (b'"' + b'\\"' * (MAX_REVIEW_BYTES // 2 - 1), "Unterminated string"),
        (b'"\\' * (MAX_REVIEW_BYTES // 2 - 1), "Unterminated string"),
        # Number runs just under the digit limit, side by side.
        (b"[" + b"1" * 100 + (b"," + b"1" * 100) * (MAX_REVIEW_BYTES // 101 - 1) + b"]", "object"),
    ],
    ids=["escaped-quotes", "quote-backslash", "long-number-runs"],
)
def test_the_json_checks_take_linear_time_on_hostile_bodies(server, body, expected):
    assert len(body) <= MAX_REVIEW_BYTES
    status, text = post(server, body)  # the client gives up after 10 s
    assert status == 400
    assert expected in text.decode()


def test_long_digit_strings_and_int64_numbers_are_fine(server):
    obj = claim([opaque(GOOD)])
    obj["metadata"]["annotations"] = {"digits": "7" * 5000}
    obj["metadata"]["generation"] = 2**63 - 1
    status, text = post(server, admission_review(obj))
    assert status == 200
    assert json.loads(text)["response"]["allowed"] is True


# ------------------------------------------------------------------ TLS handshake deadline
def test_silent_tls_clients_are_cut_and_threads_stay_bounded(hooks, tmp_path):
    cert_file, key_file, _ = self_signed(tmp_path)
    limits = HttpLimits(timeout=1.0, max_connections=3)
    webhook = Webhook(
        hooks, DRIVER, host="127.0.0.1", port=0, tls=TlsFiles(cert_file, key_file), limits=limits
    )
    webhook.start()
    client = ssl.create_default_context(cafile=str(cert_file))

    def healthz() -> int:
        conn = HTTPSConnection("127.0.0.1", webhook.port, context=client, timeout=60)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        assert healthz() == 200
        baseline = threading.active_count()
        silent = [socket.create_connection(("127.0.0.1", webhook.port), timeout=60)]
        silent += [socket.create_connection(("127.0.0.1", webhook.port), timeout=60)]
        silent += [socket.create_connection(("127.0.0.1", webhook.port)) for _ in range(10)]
        try:
            for _ in range(40):
                assert threading.active_count() - baseline <= limits.max_connections
                time.sleep(0.05)
            for sock in silent:  # no ClientHello ever: the server closes each one
                sock.settimeout(120)
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(65536):
                        pass
        finally:
            for sock in silent:
                sock.close()
        assert webhook.server.timed_out >= 1  # type: ignore[attr-defined]
        assert healthz() == 200
    finally:
        webhook.stop()


# ------------------------------------------------------------------ memory of the process
def _rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid`` in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    return rss / 1024, peak / 1024


def _memory_limit_mib() -> float:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return float(limit[:-2])


def _large_review() -> bytes:
    """A review of just under MAX_REVIEW_BYTES made of empty objects: the JSON that costs the
    most memory per byte once decoded (about 25 bytes for each byte)."""
    review = admission_review(claim([]))
    review["request"]["object"]["spec"]["padding"] = "PADDING"
    text = json.dumps(review).encode()
    count = (MAX_REVIEW_BYTES - len(text) - 16) // 3
    body = text.replace(b'"PADDING"', b"[" + b"{}," * (count - 1) + b"{}]")
    assert MAX_REVIEW_BYTES - 64 < len(body) <= MAX_REVIEW_BYTES
    return body


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_the_webhook_process_stays_inside_its_memory_limit_under_concurrent_large_reviews():
    """Six concurrent maximal reviews to the real ``dra-core webhook`` process: its peak
    resident memory stays under three quarters of its Deployment's memory limit (256 Mi).
    Before the byte budget, four such reviews took it to 266 MiB."""
    bound = 0.75 * _memory_limit_mib()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dra_core",
            "webhook",
            "--backend",
            "fake",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    drain: threading.Thread | None = None
    try:
        port = None
        until = time.monotonic() + 120
        assert process.stderr is not None
        while port is None and time.monotonic() < until:
            line = process.stderr.readline()
            assert line, "the webhook exited"
            match = re.search(r"on 127\.0\.0\.1 port (\d+)", line)
            port = int(match.group(1)) if match else None
        assert port is not None
        drain = threading.Thread(target=process.stderr.read, daemon=True)  # keep it drained
        drain.start()
        start_rss, _ = _rss_mib(process.pid)

        body = _large_review()
        answers: list[int] = []

        def send() -> None:
            conn = HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.request("POST", "/validate", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                answers.append(resp.status)
            finally:
                conn.close()

        clients = [threading.Thread(target=send) for _ in range(6)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(300)
        rss, peak = _rss_mib(process.pid)
        # 200, or 503 for a review that waited too long for its turn; never anything else.
        assert len(answers) == 6 and set(answers) <= {200, 503}, answers
        assert 200 in answers
        print(f"webhook RSS: {start_rss:.0f} MiB at start, peak {peak:.0f}, after {rss:.0f}")
        assert peak < bound, f"peak RSS {peak:.0f} MiB (from {start_rss:.0f} MiB), bound {bound}"
        assert rss < bound
    finally:
        process.terminate()
        process.wait(60)
        if drain is not None:
            drain.join(30)
        if process.stderr is not None:
            process.stderr.close()

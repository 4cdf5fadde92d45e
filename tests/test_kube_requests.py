"""What `KubeClient` sends, seen by a real HTTP server on a socket: the kubeconfig's bearer
token, the agent's name, the query and the JSON body; and how it reads the answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dra_core import __version__
from dra_core.kube.client import ApiError, KubeClient, load_client


class Recorded(BaseHTTPRequestHandler):
    """Answers every request with ``answer`` (status, headers, body) and records it."""

    seen: list[dict[str, Any]]
    answer: tuple[int, dict[str, str], bytes]

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        status, headers, payload = self.answer
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[type[Recorded]]:
    handler = type("Handler", (Recorded,), {"seen": [], "answer": (200, {}, b"{}")})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield handler
    httpd.shutdown()
    httpd.server_close()


def client_of(url: str, tmp_path: Path) -> KubeClient:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))  # JSON is YAML
    return load_client(str(path), qps=0)


def test_a_request_carries_the_token_the_agents_name_the_query_and_the_body(
    server: type[Recorded], tmp_path: Path
) -> None:
    server.answer = (201, {"Content-Type": "application/json"}, b'{"metadata":{"name":"x"}}')
    client = client_of(server.url, tmp_path)  # type: ignore[attr-defined]
    answer = client.request(
        "POST",
        "/apis/resource.k8s.io/v1/resourceslices",
        body={"metadata": {"name": "x"}, "note": "ünïcode"},
        query={"fieldSelector": "spec.nodeName=node 1", "dryRun": "All"},
    )
    assert answer == {"metadata": {"name": "x"}}
    (seen,) = server.seen
    assert seen["method"] == "POST"
    assert seen["path"] == (
        "/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dnode+1&dryRun=All"
    )
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["authorization"] == "Bearer secret-token"
    assert headers["user-agent"] == f"dra-core/{__version__}"
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert json.loads(seen["body"]) == {"metadata": {"name": "x"}, "note": "ünïcode"}
    assert client.request_count("create", "resourceslices") == 1


def test_a_get_sends_no_body_and_an_empty_answer_is_none(
    server: type[Recorded], tmp_path: Path
) -> None:
    server.answer = (200, {}, b"")
    client = client_of(server.url, tmp_path)  # type: ignore[attr-defined]
    assert client.get("/api/v1/nodes/n") is None
    (seen,) = server.seen
    assert seen["body"] == b""
    assert "content-type" not in {name.lower() for name in seen["headers"]}


def test_an_error_status_is_an_api_error_with_the_servers_message_and_retry_after(
    server: type[Recorded], tmp_path: Path
) -> None:
    status = {"kind": "Status", "message": "slow down", "code": 429}
    server.answer = (429, {"Retry-After": "3"}, json.dumps(status).encode())
    client = client_of(server.url, tmp_path)  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as info:
        client.get("/api/v1/nodes/n")
    error = info.value
    assert (error.status, error.message, error.retry_after) == (429, "slow down", 3.0)
    assert error.retriable


def test_no_server_is_an_api_error_with_status_0(tmp_path: Path) -> None:
    client = client_of("http://127.0.0.1:1", tmp_path)  # nothing listens on port 1
    with pytest.raises(ApiError) as info:
        client.get("/api/v1/nodes/n", timeout=2)
    assert info.value.status == 0
    assert info.value.retriable

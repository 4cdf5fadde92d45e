"""The liveness and metrics endpoint over real HTTP, probing the real plugin sockets."""

from __future__ import annotations

import urllib.error
import urllib.request

from dra_core import metrics
from dra_core.httpserver import StatusServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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

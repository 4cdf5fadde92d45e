"""At rest an agent's API client holds only its watch's connection to the API server.

HTTP/1.1 cannot send a request on a connection a watch streams on, so requests made while the
watch runs open a second connection; the client closes it once unused for ``idle_timeout``.
The connections are counted by the kernel's table of this process (``/proc``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from dra_core.kube.client import KubeClient, load_client
from dra_core.testing.controlplane import ControlPlane
from dra_core.testing.proc import connections

pytestmark = pytest.mark.controlplane


def _client(control_plane: ControlPlane, idle_timeout: float | None) -> KubeClient:
    api = load_client(str(control_plane.kubeconfig_path), qps=0).api
    return KubeClient(api, timeout=10, idle_timeout=idle_timeout)


def _count(client: KubeClient) -> int:
    port = urlsplit(client.api.configuration.host).port
    assert port is not None
    return connections(os.getpid(), port)


def _settles_at(client: KubeClient, want: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while (seen := _count(client)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


@pytest.fixture
def watch_then_request(control_plane: ControlPlane) -> Iterator[Any]:
    """A function: make a client, start a watch, send a request beside it; the watch ends with
    the test."""
    responses = []

    def start(idle_timeout: float | None) -> tuple[KubeClient, int]:
        client = _client(control_plane, idle_timeout)
        before = _count(client)
        client.get("/version")
        query = {"watch": "1", "timeoutSeconds": "60"}
        responses.append(client.stream("/api/v1/namespaces", query, read_timeout=90))
        client.get("/version")
        return client, before

    yield start
    for response in responses:
        response.shutdown()
        response.release_conn()


def test_request_connection_closed_when_unused_watch_kept(watch_then_request: Any) -> None:
    client, before = watch_then_request(0.5)
    assert _count(client) == before + 2, "a watch and a request beside it: two connections"
    assert _settles_at(client, before + 1, 10) == before + 1, "only the watch's stays open"
    client.get("/version")  # the closed connection is opened again for the next request
    assert _count(client) == before + 2
    assert _settles_at(client, before + 1, 10) == before + 1


def test_without_idle_timeout_the_request_connection_stays(watch_then_request: Any) -> None:
    client, before = watch_then_request(None)
    time.sleep(1.5)
    assert _count(client) == before + 2

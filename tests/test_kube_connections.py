"""At rest an agent's API client holds only its watch's connection to the API server.

HTTP/1.1 cannot send a request on a connection a watch streams on, so requests made while the
watch runs open a second connection; the client closes it once unused for ``idle_timeout``.
The connections are counted by the kernel's table of this process (``/proc``): those opened
since the test began, as other tests' clients in this process open and close theirs at times
of their own.
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
from dra_core.testing.proc import established_to, socket_inodes

pytestmark = pytest.mark.controlplane


def _client(control_plane: ControlPlane, idle_timeout: float | None) -> KubeClient:
    api = load_client(str(control_plane.kubeconfig_path), qps=0).api
    return KubeClient(api, timeout=10, idle_timeout=idle_timeout)


def _held(client: KubeClient) -> set[int]:
    """The sockets (inodes) of this process connected to the client's API server."""
    port = urlsplit(client.api.configuration.host).port
    assert port is not None
    return socket_inodes(os.getpid()) & established_to(os.getpid(), port)


class _Opened:
    """Counts the connections to the API server opened since it was made."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.earlier = _held(client)

    def count(self) -> int:
        return len(_held(self.client) - self.earlier)

    def settles_at(self, want: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while (seen := self.count()) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen


@pytest.fixture
def watch_then_request(control_plane: ControlPlane) -> Iterator[Any]:
    """A function: make a client, start a watch, send a request beside it; the watch ends with
    the test."""
    responses = []

    def start(idle_timeout: float | None) -> tuple[KubeClient, _Opened]:
        client = _client(control_plane, idle_timeout)
        opened = _Opened(client)
        client.get("/version")
        query = {"watch": "1", "timeoutSeconds": "60"}
        responses.append(client.stream("/api/v1/namespaces", query, read_timeout=90))
        client.get("/version")
        return client, opened

    yield start
    for response in responses:
        response.shutdown()
        response.release_conn()


def test_request_connection_closed_when_unused_watch_kept(watch_then_request: Any) -> None:
    client, opened = watch_then_request(0.5)
    assert opened.count() == 2, "a watch and a request beside it: two connections"
    assert opened.settles_at(1, 10) == 1, "only the watch's stays open"
    client.get("/version")  # the closed connection is opened again for the next request
    assert opened.count() == 2
    assert opened.settles_at(1, 10) == 1


def test_without_idle_timeout_the_request_connection_stays(watch_then_request: Any) -> None:
    _client, opened = watch_then_request(None)
    time.sleep(1.5)
    assert opened.count() == 2

"""HealthBoard semantics and the NodeWatchResources stream over a real socket."""

from __future__ import annotations

import threading
import time

from dra_core.kubelet import DeviceHealthState, HealthBoard
from dra_core.testing.kubelet import FakeKubelet

from .conftest import PluginFactory

GPU0 = DeviceHealthState("node-1", "gpu-0", True)
GPU1 = DeviceHealthState("node-1", "gpu-1", None)


def test_board_version_changes_only_with_content() -> None:
    board = HealthBoard([GPU0])
    start = board.version
    board.set([GPU0])
    assert board.version == start
    board.set([GPU0, GPU1])
    assert board.version == start + 1
    assert board.snapshot() == [GPU0, GPU1]


def test_board_wait_changed() -> None:
    board = HealthBoard()
    version = board.version
    t0 = time.monotonic()
    assert board.wait_changed(version, 0.05) == version
    assert time.monotonic() - t0 >= 0.04
    assert board.wait_changed(-1, 5) == version  # differs already: no wait
    timer = threading.Timer(0.05, board.set, args=([GPU0],))
    timer.start()
    assert board.wait_changed(version, 5) == version + 1
    timer.join()


def test_stream_sends_initial_state_and_changes(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0, GPU1])
    plugin = make_plugin(health=board)
    unhealthy = DeviceHealthState("node-1", "gpu-0", False, "driver unbound" + "!" * 2000)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        stream = kubelet.watch_health(timeout=10)
        first = next(stream)
        board.set([unhealthy, GPU1])
        second = next(stream)
        stream.close()
    assert [(d.device, d.healthy) for d in first] == [("gpu-0", True), ("gpu-1", None)]
    assert all(d.timeout_seconds == 30 and d.pool == "node-1" for d in first)
    assert [(d.device, d.healthy) for d in second] == [("gpu-0", False), ("gpu-1", None)]
    assert second[0].message.startswith("driver unbound")
    assert len(second[0].message) == 1024


def test_stream_resends_unchanged_state(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0])
    plugin = make_plugin(health=board, health_resend_interval=0.1)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        t0 = time.monotonic()
        messages = kubelet.read_health(3, timeout=5)
    assert time.monotonic() - t0 < 2
    assert all(m == messages[0] for m in messages)


def test_stream_ends_when_the_plugin_stops(make_plugin: PluginFactory) -> None:
    board = HealthBoard([GPU0])
    plugin = make_plugin(health=board)
    with FakeKubelet(plugin.registration_socket) as kubelet:
        kubelet.register()
        stream = kubelet.watch_health(timeout=10)
        next(stream)
        t0 = time.monotonic()
        plugin.stop(grace=1)
        rest = list(stream_until_end(stream))
    assert time.monotonic() - t0 < 3
    assert len(rest) <= 1


def stream_until_end(stream):  # type: ignore[no-untyped-def]
    import grpc

    try:
        yield from stream
    except grpc.RpcError:
        return

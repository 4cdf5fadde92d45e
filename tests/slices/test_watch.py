"""Unit tests of the ResourceSlice watch loop with a scripted stream."""

from __future__ import annotations

import json
import threading

from dra_core.kube.client import ApiError
from dra_core.kube.retry import Backoff
from dra_core.slices import watch
from dra_core.slices.watch import RELIST, SliceWatcher, _lines


class FakeResponse:
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks
        self.released = False

    def stream(self, amt=None, decode_content=True):
        yield from self.chunks

    def release_conn(self):
        self.released = True

    def shutdown(self):
        pass


def event(kind: str, name: str, rv: str) -> bytes:
    obj = {"metadata": {"name": name, "resourceVersion": rv}}
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def test_lines_split_across_chunks():
    response = FakeResponse([b'{"a": 1}\n{"b"', b": 2}\n\n", b'{"c": 3}'])
    assert list(_lines(response)) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']


class FakeClient:
    def __init__(self):
        self.lists = 0

    def get(self, path, query=None):
        self.lists += 1
        return {"metadata": {"resourceVersion": f"{self.lists}00"}, "items": []}


def test_events_relist_on_expiry_and_errors(monkeypatch):
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    watched_from: list[str] = []
    streams = [
        [event("ADDED", "s1", "101"), event("BOOKMARK", "", "102")],
        [event("DELETED", "s1", "103"), b'{"type": "ERROR", "object": {"code": 410}}\n'],
        ApiError("GET", "/x", 0, "down"),
        [event("MODIFIED", "s2", "301")],
    ]

    def fake_open(client, path, query, *, read_timeout):
        watched_from.append(query["resourceVersion"])
        assert query["watch"] == "1" and query["fieldSelector"] == "spec.nodeName=n"
        if not streams:
            stop.set()
            return FakeResponse([])
        item = streams.pop(0)
        if isinstance(item, Exception):
            raise item
        return FakeResponse(item)

    monkeypatch.setattr(watch, "open_stream", fake_open)
    client = FakeClient()
    watcher = SliceWatcher(
        client,  # type: ignore[arg-type]
        "spec.nodeName=n",
        lambda kind, obj: seen.append((kind, obj.get("metadata", {}).get("name", ""))),
        stop=stop,
        backoff=Backoff(delays=(0.001,)),
    )
    watcher.run()
    assert seen == [
        (RELIST, ""),
        ("ADDED", "s1"),  # the bookmark is not reported
        ("DELETED", "s1"),
        (RELIST, ""),  # after 410 Gone
        (RELIST, ""),  # after the connection error
        ("MODIFIED", "s2"),
    ]
    # Resumes from the last version seen (the bookmark's), lists again after 410 and errors.
    assert watched_from == ["100", "102", "200", "300", "301"]
    assert client.lists == 3


def test_cache_follows_events_and_ended_watches_resume_without_listing(monkeypatch):
    stop = threading.Event()
    snapshots: list[list[tuple[str, str]]] = []
    watched_from: list[str] = []
    streams = [
        [event("ADDED", "s1", "101"), event("ADDED", "s2", "102")],  # ends: timeoutSeconds
        [event("MODIFIED", "s1", "103"), event("BOOKMARK", "", "104")],  # ends again
        [event("DELETED", "s2", "105")],
    ]
    client = FakeClient()

    def fake_open(client_, path, query, *, read_timeout):
        watched_from.append(query["resourceVersion"])
        if not streams:
            stop.set()
            return FakeResponse([])
        return FakeResponse(streams.pop(0))

    def record(kind, obj):
        snap = watcher.snapshot() or []
        snapshots.append(
            sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in snap)
        )

    monkeypatch.setattr(watch, "open_stream", fake_open)
    watcher = SliceWatcher(
        client,  # type: ignore[arg-type]
        "spec.nodeName=n",
        record,
        stop=stop,
        backoff=Backoff(delays=(0.001,)),
    )
    assert watcher.snapshot() is None  # before the first list
    watcher.run()
    assert client.lists == 1 and watcher.lists == 1
    assert watched_from == ["100", "102", "104", "105"]
    assert snapshots[-1] == [("s1", "103")]
    # A write's result is kept, and an older event does not replace it.
    watcher.remember({"metadata": {"name": "s1", "resourceVersion": "110"}})
    watcher._store({"metadata": {"name": "s1", "resourceVersion": "107"}})
    assert [o["metadata"]["resourceVersion"] for o in watcher.snapshot() or []] == ["110"]
    watcher.forget("s1")
    assert watcher.snapshot() == []

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

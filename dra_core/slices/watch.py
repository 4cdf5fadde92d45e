"""A watch on the ResourceSlices of one node and driver, over raw HTTP.

The publisher needs to know quickly when a slice it owns is edited or deleted behind its back
(by a user, or by the kubelet wiping a node's slices when it restarts). `SliceWatcher` lists
the slices once for a resource version, then streams ``?watch=1`` events from it. When a watch
request ends (its ``timeoutSeconds``), the next one resumes from the last resource version
seen (bookmarks included), without listing. It lists again only when the watch fails or the
server says the version is too old (410 Gone).

The watcher keeps the slices it has seen (`snapshot`): the publisher compares against them
instead of listing, so the watch is the source of truth and nothing is read at rest. The
publisher records its own writes with `remember`/`forget`, so a comparison made before the
echo of a write arrives sees the written object.

Objects are read as plain JSON (never through the client's typed models, which drop fields
they do not know).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dra_core.kube.client import ApiError, KubeClient
from dra_core.kube.retry import Backoff
from dra_core.lazylog import logger

__all__ = ("RELIST", "SLICES_PATH", "SliceWatcher", "open_stream")

SLICES_PATH = "/apis/resource.k8s.io/v1/resourceslices"
#: The event type passed to the callback after each (re)list: anything may have changed.
RELIST = "RELIST"

#: Called with the event type (ADDED, MODIFIED, DELETED or `RELIST`) and the object ({} for
#: RELIST).
EventCallback = Callable[[str, Mapping[str, Any]], None]


def open_stream(
    client: KubeClient, path: str, query: Mapping[str, str], *, read_timeout: float
) -> Any:
    """Start a streaming GET and return the open urllib3 response (status 2xx).

    Raises `ApiError` for an HTTP error status or an unreachable server.
    """
    return client.stream(path, query, read_timeout=read_timeout)


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-separated JSON documents of a watch stream, as they arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class SliceWatcher:
    """Lists, then watches, the ResourceSlices matching ``field_selector``, until stopped.

    `run` blocks (run it in a thread); `close` (from another thread) makes it return soon.
    Errors never end the loop: the watcher waits (``backoff``) and lists again.
    """

    def __init__(
        self,
        client: KubeClient,
        field_selector: str,
        callback: EventCallback,
        *,
        stop: threading.Event,
        backoff: Backoff | None = None,
        timeout_seconds: int = 300,
    ) -> None:
        self._client = client
        self._selector = field_selector
        self._callback = callback
        self._stop = stop
        self._backoff = backoff or Backoff()
        self._timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._response: Any = None
        self._objects: dict[str, dict[str, Any]] = {}
        #: Set once the first list has filled the cache.
        self.synced = threading.Event()
        #: Watches opened and lists made so far (for tests and logs).
        self.watches = 0
        self.lists = 0

    def snapshot(self) -> list[dict[str, Any]] | None:
        """The slices as last seen (listed, watched or remembered); None before the first list."""
        if not self.synced.is_set():
            return None
        with self._lock:
            return list(self._objects.values())

    def remember(self, obj: Mapping[str, Any]) -> None:
        """Record an object the API server returned for a write (never older than one seen)."""
        self._store(dict(obj))

    def forget(self, name: str) -> None:
        """Record that a slice was deleted."""
        with self._lock:
            self._objects.pop(name, None)

    def _store(self, obj: dict[str, Any]) -> None:
        name = obj.get("metadata", {}).get("name")
        if not name:
            return
        with self._lock:
            old = self._objects.get(name)
            if old is None or not _older(obj, old):
                self._objects[name] = obj

    def run(self) -> None:
        """List and watch until the stop event is set."""
        failures = 0
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                    self._callback(RELIST, {})
                resource_version = self._watch(resource_version)
                failures = 0
            except _Expired:
                logger.debug("ResourceSlice watch: resource version expired, listing again")
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any failure
                if self._stop.is_set():
                    break
                failures += 1
                delay = self._backoff.delay(failures, getattr(exc, "retry_after", None))
                logger.warning(
                    "ResourceSlice watch ({}) failed (attempt #{}); retrying in {:.1f} s: {}",
                    self._selector,
                    failures,
                    delay,
                    exc,
                )
                resource_version = None
                self._stop.wait(delay)
        logger.debug("ResourceSlice watch ({}) stopped", self._selector)

    def close(self) -> None:
        """Interrupt a blocked read (the stop event must be set too, or it reconnects)."""
        with self._lock:
            response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort on a dying connection
                logger.debug("ResourceSlice watch: shutdown: {}", exc)

    def _list(self) -> str:
        data = self._client.get(SLICES_PATH, {"fieldSelector": self._selector})
        self.lists += 1
        objects = {
            obj["metadata"]["name"]: obj
            for obj in data.get("items") or []
            if obj.get("metadata", {}).get("name")
        }
        with self._lock:
            self._objects = objects
        self.synced.set()
        return str(data.get("metadata", {}).get("resourceVersion", ""))

    def _watch(self, resource_version: str) -> str:
        """Stream events from ``resource_version``; return the last version seen."""
        query = {
            "watch": "1",
            "fieldSelector": self._selector,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._timeout_seconds),
        }
        response = open_stream(
            self._client, SLICES_PATH, query, read_timeout=self._timeout_seconds + 30.0
        )
        self.watches += 1
        with self._lock:
            self._response = response
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind = event.get("type", "")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired
                    raise ApiError("WATCH", SLICES_PATH, int(obj.get("code") or 0), str(obj))
                version = obj.get("metadata", {}).get("resourceVersion")
                if version:
                    resource_version = str(version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.forget(obj.get("metadata", {}).get("name", ""))
                else:
                    self._store(obj)
                self._callback(kind, obj)
        finally:
            with self._lock:
                self._response = None
            response.release_conn()
        return resource_version


def _older(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether ``new`` has a lower resource version than ``old`` (when both are numbers)."""
    a = str(new.get("metadata", {}).get("resourceVersion", ""))
    b = str(old.get("metadata", {}).get("resourceVersion", ""))
    return a.isdigit() and b.isdigit() and int(a) < int(b)


class _Expired(Exception):
    """The watch's resource version is too old (HTTP 410): list again."""

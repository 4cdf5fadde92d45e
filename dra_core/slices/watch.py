"""A watch on the ResourceSlices of one node and driver, over raw HTTP.

The publisher needs to know quickly when a slice it owns is edited or deleted behind its back
(by a user, or by the kubelet wiping a node's slices when it restarts). `SliceWatcher` lists
the slices once for a resource version, then streams ``?watch=1`` events from it, and starts
over (list, then watch) when the server says the version is too old. It does not keep a
cache: it only tells its callback what happened, and the publisher re-reads and compares.

Objects are read as plain JSON (never through the client's typed models, which drop fields
they do not know).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from loguru import logger

from dra_core.kube.client import ApiError, KubeClient
from dra_core.kube.retry import Backoff

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
        #: Watches opened so far (for tests and logs).
        self.watches = 0

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
                delay = self._backoff.delay(failures)
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
                if kind != "BOOKMARK":
                    self._callback(kind, obj)
        finally:
            with self._lock:
                self._response = None
            response.release_conn()
        return resource_version


class _Expired(Exception):
    """The watch's resource version is too old (HTTP 410): list again."""

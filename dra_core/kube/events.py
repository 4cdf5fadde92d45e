"""Kubernetes Events for failures a user must see, such as a claim that cannot be prepared.

Events are posted from a background thread through a bounded queue, so a slow or unreachable
API server never delays a kubelet call; when the queue is full, events are dropped and logged.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from dra_core.kube.client import ApiError, KubeClient
from dra_core.lazylog import logger

__all__ = ("EventRecorder", "ObjectRef")

#: The API server limits an event message to 1 KiB.
_MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class ObjectRef:
    """The object an event is about."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str


class EventRecorder:
    """Posts core/v1 Warning events about objects, in the background."""

    def __init__(
        self, client: KubeClient, component: str, host: str, queue_size: int = 256
    ) -> None:
        self.client = client
        self.component = component
        self.host = host
        self._queue: queue.Queue[dict[str, object] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="dra-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    def warning(self, obj: ObjectRef, reason: str, message: str) -> None:
        """Record a Warning event about ``obj``; never blocks."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event: dict[str, object] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{obj.name}.", "namespace": obj.namespace},
            "involvedObject": {
                "apiVersion": obj.api_version,
                "kind": obj.kind,
                "namespace": obj.namespace,
                "name": obj.name,
                "uid": obj.uid,
            },
            "type": "Warning",
            "reason": reason,
            "message": message[:_MESSAGE_LIMIT],
            "source": {"component": self.component, "host": self.host},
            "reportingComponent": self.component,
            "reportingInstance": self.host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            logger.warning("event queue full; dropped event {} about {}", reason, obj.name)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            metadata = event["metadata"]
            assert isinstance(metadata, dict)
            try:
                self.client.request(
                    "POST",
                    f"/api/v1/namespaces/{metadata['namespace']}/events",
                    body=event,
                    timeout=5,
                )
            except ApiError as exc:
                logger.info("could not record event {}: {}", event["reason"], exc)

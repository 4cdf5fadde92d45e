"""The agent's HTTP endpoint: ``/healthz`` (liveness), ``/readyz`` and ``/metrics``.

``/healthz`` answers 200 only when the registration and DRA sockets really answer a gRPC
call, so a wedged server gets the pod restarted rather than silently failing prepares; an
API server that is slow or down does not fail it (a restart would not help). ``/readyz``
answers 503 while the agent starts or its API server does not answer.

It listens on ``host`` (``--http-host``, env ``DRA_HTTP_HOST``; default all addresses). The
kubelet probes the pod's IP, so an address the kubelet can reach is needed: the DaemonSet of
``deploy/`` sets the pod IP (downward API ``status.podIP``), never ``127.0.0.1``. The server
enforces :data:`STATUS_LIMITS` (see :mod:`dra_core.httpbase`): a client that keeps a
connection open without finishing its request is cut off after 10 s, and at most 16
connections (threads) are served at once.
"""

from __future__ import annotations

from collections.abc import Callable

from dra_core import metrics
from dra_core.httpbase import BackgroundServer, Handler, HttpLimits, LimitedHTTPServer
from dra_core.lazylog import logger

__all__ = ("STATUS_LIMITS", "StatusServer")

#: The status endpoint's limits: the kubelet's probe and a Prometheus scrape are all it serves.
STATUS_LIMITS = HttpLimits(timeout=10.0, max_connections=16, max_header_bytes=16 * 1024)


class StatusServer(BackgroundServer):
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` on a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        probe: Callable[[], list[str]],
        limits: HttpLimits = STATUS_LIMITS,
        ready: Callable[[], list[str]] | None = None,
    ) -> None:
        self.probe = probe
        self.ready = ready or probe
        server = self

        class StatusHandler(Handler):
            def do_GET(self) -> None:  # the http.server API names it
                self.received()
                if self.path == "/healthz":
                    problems = server.probe()
                    self.send_text(503 if problems else 200, "\n".join(problems) or "ok")
                elif self.path == "/readyz":
                    problems = server.ready()
                    self.send_text(503 if problems else 200, "\n".join(problems) or "ok")
                elif self.path == "/metrics":
                    self.send_body(200, metrics.CONTENT_TYPE, metrics.render())
                else:
                    self.send_text(404, "not found")

        http = LimitedHTTPServer((host, port), StatusHandler, limits, name="status endpoint")
        super().__init__(http, "dra-http")

    def start(self) -> None:
        super().start()
        logger.info("liveness and metrics on {} port {}", self.host, self.port)

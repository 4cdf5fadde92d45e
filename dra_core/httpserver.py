"""The agent's HTTP endpoint: ``/healthz`` for the liveness probe and ``/metrics``.

``/healthz`` answers 200 only when the registration and DRA sockets really answer a gRPC
call, so a wedged server gets the pod restarted rather than silently failing prepares.
"""

from __future__ import annotations

from collections.abc import Callable
from http.server import ThreadingHTTPServer

from loguru import logger

from dra_core import metrics
from dra_core.httpbase import BackgroundServer, Handler

__all__ = ("StatusServer",)


class StatusServer(BackgroundServer):
    """Serves ``/healthz`` and ``/metrics`` on a background thread."""

    def __init__(self, host: str, port: int, probe: Callable[[], list[str]]) -> None:
        self.probe = probe
        server = self

        class StatusHandler(Handler):
            def do_GET(self) -> None:  # the http.server API names it
                if self.path == "/healthz":
                    problems = server.probe()
                    self.send_text(503 if problems else 200, "\n".join(problems) or "ok")
                elif self.path == "/metrics":
                    self.send_body(200, metrics.CONTENT_TYPE, metrics.render())
                else:
                    self.send_text(404, "not found")

        super().__init__(ThreadingHTTPServer((host, port), StatusHandler), "dra-http")

    def start(self) -> None:
        super().start()
        logger.info("liveness and metrics on port {}", self.port)

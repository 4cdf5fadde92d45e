"""The agent's HTTP endpoint: ``/healthz`` for the liveness probe and ``/metrics``.

``/healthz`` answers 200 only when the registration and DRA sockets really answer a gRPC
call, so a wedged server gets the pod restarted rather than silently failing prepares.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger

from dra_core import metrics

__all__ = ("StatusServer",)


class StatusServer:
    """Serves ``/healthz`` and ``/metrics`` on a background thread."""

    def __init__(self, host: str, port: int, probe: Callable[[], list[str]]) -> None:
        self.probe = probe
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API names it
                if self.path == "/healthz":
                    problems = server.probe()
                    status = 503 if problems else 200
                    body = ("\n".join(problems) if problems else "ok").encode() + b"\n"
                    self._send(status, "text/plain; charset=utf-8", body)
                elif self.path == "/metrics":
                    self._send(200, metrics.CONTENT_TYPE, metrics.render())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.trace("http: {}", format % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dra-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("liveness and metrics on port {}", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

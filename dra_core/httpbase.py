"""The little both HTTP servers of dra-core share: the agent's status endpoint and the
admission webhook answer plain text or bytes, log quietly, and serve on a background thread."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger

__all__ = ("TEXT", "BackgroundServer", "Handler")

TEXT = "text/plain; charset=utf-8"


class Handler(BaseHTTPRequestHandler):
    """A request handler with the plain answers every endpoint gives."""

    def send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_text(self, status: int, text: str) -> None:
        self.send_body(status, TEXT, f"{text}\n".encode())

    def log_message(self, format: str, *args: object) -> None:
        logger.trace("http: {}", format % args)


class BackgroundServer:
    """Runs ``server`` on a daemon thread until :meth:`stop`."""

    def __init__(self, server: ThreadingHTTPServer, name: str) -> None:
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

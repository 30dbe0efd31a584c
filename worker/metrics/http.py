"""The Prometheus endpoint on metrics.listen (HOST:PORT; port 0 picks a free one): the
`prometheus-client` WSGI app on a small HTTP server in its own thread.

Whoever reaches the port may open connections and send nothing. Each connection is served by a
thread of its own, so at most MAX_CONNECTIONS are served at once (more are closed at once) and
one that sends nothing for CONNECTION_TIMEOUT_S is dropped: a scraper needs one, a flood of idle
ones cannot take the worker's threads and memory."""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S  # set on the connection's socket

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)  # replaced per server in __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _BoundedServer6(_BoundedServer):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        address = host.strip("[]")
        server_class = _BoundedServer6 if ":" in address else _BoundedServer
        self._server: WSGIServer = make_server(
            address, int(port), make_wsgi_app(registry), server_class, _QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        self.port: int = self._server.server_port
        log.info("serving metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

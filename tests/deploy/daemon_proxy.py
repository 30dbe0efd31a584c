"""A unix-socket forwarder to the real Docker daemon that a test can cut and restore.

The daemon itself is shared by every session on the machine and must never be stopped; a
worker pointed at this proxy instead sees "its" daemon go away and come back."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path


class DaemonProxy:
    """Listens on `path` and forwards each connection to `target` while up."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        self.path = path
        self.target = target
        # Requests whose first bytes hold this are forwarded, but their connection is cut
        # before the answer comes back: the daemon did the work, the client never hears.
        self.lose_answers_to: bytes | None = None
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Closes the listener and every forwarded connection; the socket file goes too."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self.path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            lost = threading.Event()
            threading.Thread(
                target=pump,
                args=(client, upstream, lambda: self.lose_answers_to, lost),
                daemon=True,
            ).start()
            threading.Thread(target=pump, args=(upstream, client, None, lost), daemon=True).start()


def pump(
    source: socket.socket,
    sink: socket.socket,
    marker: Callable[[], bytes | None] | None = None,
    lost: threading.Event | None = None,
) -> None:
    """Copies source to sink. A request holding what `marker()` returns sets `lost`; an
    answer while `lost` is set cuts both sockets instead."""
    try:
        while data := source.recv(65536):
            wanted = marker() if marker is not None else None
            if wanted is not None and lost is not None and wanted in data:
                lost.set()
            elif marker is None and lost is not None and lost.is_set():
                for end in (source, sink):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)
                return
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

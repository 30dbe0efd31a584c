"""Run inside a pod's network namespace (under nsenter): forwards connections made to a unix
socket on the host's filesystem to 127.0.0.1:PORT in that namespace, so a test on the host
reaches a port nothing outside the pod can reach.

    nsenter --net=/proc/PID/ns/net python -m tests.deploy.netns_forward SOCKET PORT
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from tests.deploy.daemon_proxy import pump


def main() -> None:
    path, port = Path(sys.argv[1]), int(sys.argv[2])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            upstream.connect(("127.0.0.1", port))
        except OSError:
            client.close()
            upstream.close()
            continue
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


if __name__ == "__main__":
    main()

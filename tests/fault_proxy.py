"""A TCP fault proxy in front of a local test service: transient storage faults on demand."""

from __future__ import annotations

import contextlib
import socket
import threading

from services import free_port

_LOCALHOST = "127.0.0.1"  # the proxy and its target are loopback-only, like every test service


class FaultProxy:
    """A TCP proxy to a local service that answers the next N new connections with an HTTP
    503 (or resets them), then forwards transparently: transient storage faults on demand.

    `fail_next(n)` also drops every open forwarded connection, so pooled keep-alive
    connections cannot dodge the faults. `injected` counts the faults delivered.
    """

    def __init__(self, target_port: int) -> None:

        self.target_port = target_port
        self.port = free_port()
        self.injected = 0
        self._pending = 0
        self._mode = "http503"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{_LOCALHOST}:{self.port}"

    def start(self) -> FaultProxy:

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_LOCALHOST, self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        return self

    def fail_next(self, count: int, mode: str = "http503") -> None:
        with self._lock:
            self._pending, self._mode = count, mode
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept_loop(self) -> None:

        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                inject = self._pending > 0
                if inject:
                    self._pending -= 1
                    self.injected += 1
                mode = self._mode
            target = self._inject if inject else self._forward
            threading.Thread(target=target, args=(conn, mode), daemon=True).start()

    @staticmethod
    def _inject(conn: socket.socket, mode: str) -> None:
        with conn:
            if mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
                return
            conn.settimeout(2)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                conn.sendall(head.encode() + body)

    def _forward(self, conn: socket.socket, _mode: str) -> None:

        try:
            upstream = socket.create_connection((_LOCALHOST, self.target_port), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((conn, upstream))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)
        with self._lock:
            self._open.discard(conn)
            self._open.discard(upstream)
        conn.close()
        upstream.close()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        self.fail_next(0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

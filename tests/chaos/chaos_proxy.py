"""An HTTP fault-injecting proxy for an S3 endpoint: random 503s, slow answers, connection
resets, and permanent failures for chosen paths.

Contract: every client connection carries exactly one request (the proxy answers with
`Connection: close`), so each request is a separate fault decision even for keep-alive clients.
With probability `rate` a request gets a fault, chosen uniformly from `modes` ("503", "slow",
"reset"); "slow" delays the forwarded answer by `slow_s`. A request whose path contains one of
`permanent` substrings always gets a 503 (a shard's object that stays unavailable). `injected`
counts faults by kind. Decisions use a seeded `random.Random`, so a run can be repeated.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time

from services import free_port

_BODY = b"<Error><Code>ServiceUnavailable</Code><Message>chaos proxy</Message></Error>"


class ChaosProxy:
    def __init__(
        self,
        target_port: int,
        *,
        rate: float = 0.1,
        modes: tuple[str, ...] = ("503", "slow", "reset"),
        slow_s: float = 1.5,
        seed: int = 0,
    ) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.rate, self.modes, self.slow_s = rate, modes, slow_s
        self.permanent: set[str] = set()
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    def start(self) -> ChaosProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _decide(self, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if any(part in path for part in self.permanent):
                fault: str | None = "permanent"
            elif self._rng.random() < self.rate:
                fault = self._rng.choice(self.modes)
            else:
                fault = None
            if fault:
                self.injected[fault] += 1
            return fault

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                head, body = _read_request(conn)
            except (OSError, ValueError):
                return
            if not head:
                return
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1].decode("latin-1") if b" " in lines[0] else ""
            fault = self._decide(path)
            if fault == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
                return
            if fault in ("503", "permanent"):
                body = b"" if lines[0].startswith(b"HEAD ") else _BODY  # HEAD: no body
                reply = (
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body
                with contextlib.suppress(OSError):
                    conn.sendall(reply)
                return
            if fault == "slow":
                time.sleep(self.slow_s)
            kept = [
                line
                for line in lines[1:]
                if line and not line.lower().startswith((b"connection:", b"expect:"))
            ]
            request = b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""]) + body
            try:
                with socket.create_connection(("127.0.0.1", self.target_port), timeout=30) as up:
                    up.sendall(request)
                    while chunk := up.recv(65536):
                        conn.sendall(chunk)
            except OSError:
                return


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length framing; `Expect: 100-continue` honoured)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
        if len(data) > 1 << 20:
            raise ValueError("request head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    expect = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"expect" and b"100" in value:
            expect = True
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked requests are not supported by this proxy")
    if expect and len(rest) < length:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    while len(rest) < length:
        chunk = conn.recv(min(65536, length - len(rest)))
        if not chunk:
            raise ValueError("client closed mid-body")
        rest += chunk
    return head, rest

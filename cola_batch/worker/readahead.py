"""Read-ahead: fetch the next shard's staged input while the current shard generates.

Contract:
* Broker prefetch stays at one shard per worker. A second reserved message would hide a shard
  from idle workers and from the autoscaler, and age under the visibility timeout while it
  waits. Instead, once a shard is `TAIL_FRACTION` done, a background thread *peeks* (never
  takes) at the message the queue will hand out next — the right end of kombu's list — and
  downloads that shard's staged input into memory. It re-peeks every `poll_s` until the shard
  ends, so the copy follows the queue head while other workers take shards.
* The copy is a cache, never a claim: staged inputs are immutable once their shard is enqueued,
  so a copy is always valid, and which worker runs a shard is still decided by Celery. `take`
  returns the copy only for the exact URI asked for (waiting for a download of that URI still in
  flight) and forgets it; anything else is a miss and the caller reads storage as usual.
* At most one staged input is held per process (the newest head), and none larger than
  `max_bytes` (a shard of huge prompts is read when it starts). Reads are tried once, without
  the storage retry policy, and a head that was too big or unreadable is not tried again
  (its own shard run retries it properly). Read-ahead never raises:
  broker, storage or message-format failures are logged at debug level and leave a miss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cola_batch import storage
from cola_batch.retries import RetryPolicy
from cola_batch.worker.broker import peek_next_shard

log = logging.getLogger(__name__)

TAIL_FRACTION = 0.75
MAX_BYTES = 256 * 2**20
ONCE = RetryPolicy(retries=0)


class ReadAhead:
    """One process's read-ahead slot: at most one staged input held in memory."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        *,
        read: Callable[[str], bytes] = lambda uri: storage.read_bytes(uri, retry=ONCE),
        size: Callable[[str], int] = lambda uri: storage.size(uri, retry=ONCE),
        poll_s: float = 1.0,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._client_factory = client_factory
        self._read, self._size = read, size
        self.max_bytes = max_bytes
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._held: tuple[str, bytes] | None = None
        self._loading: tuple[str, threading.Event] | None = None
        self._skip: str | None = None  # the last head too big or unreadable: not tried again
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ consumer side

    def take(self, uri: str, *, wait_s: float = 30.0) -> bytes | None:
        """The held copy of `uri` (and forget it), or None: the caller reads storage."""
        with self._lock:
            loading = self._loading
        if loading is not None and loading[0] == uri:
            loading[1].wait(wait_s)
        with self._lock:
            held, self._held = self._held, None
        if held is not None and held[0] == uri:
            self.hits += 1
            return held[1]
        self.misses += 1
        return None

    # ------------------------------------------------------------------ producer side

    def fetch_head(self, queue: str) -> None:
        """Peek at the queue head once and hold its staged input (if not already held)."""
        try:
            task = peek_next_shard(self._client_factory(), queue)
        except Exception as exc:  # noqa: BLE001 - read-ahead is an optimisation only
            log.debug("read-ahead: cannot peek at %s: %s", queue, exc)
            return
        if task is None:
            return
        uri = task.input_uri
        with self._lock:
            if uri == self._skip or (self._held is not None and self._held[0] == uri):
                return
            done = threading.Event()
            self._loading = (uri, done)
        try:
            if self._size(uri) > self.max_bytes:
                self._skip, data = uri, None
            else:
                data = self._read(uri)
        except Exception as exc:  # noqa: BLE001
            log.debug("read-ahead: cannot read %s: %s", storage.redact(uri), exc)
            self._skip, data = uri, None
        with self._lock:
            if data is not None:
                self._held = (uri, data)
            self._loading = None
        done.set()
        if data is not None:
            log.debug("read-ahead: holding %s (%d bytes)", storage.redact(uri), len(data))

    @contextmanager
    def following(self, queue: str) -> Iterator[Callable[[int, int], None]]:
        """Yield `progress(done, total)`; from `TAIL_FRACTION` on, follow the queue head."""
        stop = threading.Event()
        thread: threading.Thread | None = None

        def follow() -> None:
            while not stop.is_set():
                self.fetch_head(queue)
                stop.wait(self.poll_s)

        def progress(done: int, total: int) -> None:
            nonlocal thread
            if thread is None and done >= TAIL_FRACTION * total:
                thread = threading.Thread(target=follow, name="cola-read-ahead", daemon=True)
                thread.start()

        try:
            yield progress
        finally:
            stop.set()  # a download in flight completes; `take` waits for it if it wants it

"""An intake process's way to the model process: the engine's ``ModelPort`` over a Unix socket.

``submit`` writes the item's pixels into shared memory (``worker.split.pixels``), sends the rest
and returns a Future that a reader thread resolves with the model process's answer. When the
model process goes away (killed, restarting), every item in it fails with ``Retryable`` (the
task layer runs the job again later, so nothing is lost) and the client connects again in the
background; until it has, ``submit`` raises ``Retryable`` at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Client, Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from producer.protocol.errors import Retryable
from worker.split.pixels import Arena

log = logging.getLogger(__name__)


class ModelProcessGone(Retryable):
    """The model process ended (or is restarting) while a job needed it."""


class RemoteModel:
    """The model process, as seen from an intake process."""

    def __init__(self, path: str, *, connect_s: float = 120.0) -> None:
        self.path = path
        self.connect_s = connect_s
        self.arena = Arena()
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Future[Any], list[SharedMemory]]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        self.bytes_sent = 0
        """Bytes pickled onto the socket for items (pixels excluded: they are in the arena)."""
        self.items_sent = 0

    # --- ModelPort ---------------------------------------------------------------------------

    def start(self) -> None:
        self._conn = self._connect(self.connect_s)
        if self._conn is None:
            # Ends the intake process (Celery would go on consuming without its services, and
            # answer every job with an error); the launcher starts it again.
            raise SystemExit(
                f"no model process answered on {self.path} in {self.connect_s:g}s "
                "(BLIPQ_MODEL_CONNECT_S); this intake process ends"
            )
        self._reader = threading.Thread(target=self._read, name="blipq-model-link", daemon=True)
        self._reader.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._reader is not None:
            self._reader.join(timeout)
        self._fail_pending("the worker is stopping")
        self.arena.close()
        if self.items_sent:
            log.info(
                "%d items sent to the model process: %.0f bytes per item in shared memory, "
                "%.0f through the socket",
                self.items_sent,
                self.arena.bytes_shared / self.items_sent,
                self.bytes_sent / self.items_sent,
            )

    def preparing(self, model: str, delta: int) -> None:
        with contextlib.suppress(ModelProcessGone):  # a new model process starts from zero
            self._send(("prep", model, delta))

    def wake(self) -> None:
        """Nothing to do: the model process looks again when a preparation ends."""

    def submit(self, key: Hashable, item: Any) -> Future[Any]:
        rid = next(self._ids)
        future: Future[Any] = Future()
        packed, blocks = self.arena.pack(item)
        with self._lock:
            self._pending[rid] = (future, blocks)
        try:
            self.bytes_sent += self._send(("submit", rid, key, packed))
            self.items_sent += 1
        except ModelProcessGone:
            self._resolve(rid, False, ModelProcessGone(self._gone_message()))
        return future

    # --- the link ----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> int:
        from multiprocessing.reduction import ForkingPickler

        data = bytes(ForkingPickler.dumps(message))
        with self._send_lock:
            conn = self._conn
            if conn is None:
                raise ModelProcessGone(self._gone_message())
            try:
                conn.send_bytes(data)
            except OSError as exc:
                raise ModelProcessGone(self._gone_message()) from exc
        return len(data)

    def _gone_message(self) -> str:
        return "the model process is not running (it is restarting); the job runs again"

    def _read(self) -> None:
        while not self._stopping.is_set():
            conn = self._conn
            try:
                if conn is None:
                    raise EOFError
                rid, ok, value = conn.recv()
            except (EOFError, OSError):
                if self._stopping.is_set():
                    return
                log.warning("lost the model process; its jobs in flight will run again")
                with self._send_lock:
                    self._conn = None
                self._fail_pending(self._gone_message())
                conn = self._connect(None)
                with self._send_lock:
                    self._conn = conn
                if conn is not None:
                    log.info("connected to the model process again")
                continue
            self._resolve(rid, ok, value)

    def _connect(self, within_s: float | None) -> Connection | None:
        """Connect, retrying until ``within_s`` passes (None: until stopped)."""
        deadline = None if within_s is None else time.monotonic() + within_s
        while not self._stopping.is_set():
            try:
                return Client(self.path, family="AF_UNIX")
            except OSError:
                if deadline is not None and time.monotonic() > deadline:
                    return None
                time.sleep(0.1)
        return None

    def _resolve(self, rid: int, ok: bool, value: Any) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is None:
            return
        future, blocks = entry
        self.arena.release(blocks)
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except InvalidStateError:  # the caller gave up on it (its time limit passed)
            pass

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            rids = list(self._pending)
        for rid in rids:
            self._resolve(rid, False, ModelProcessGone(message))

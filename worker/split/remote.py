"""An intake process's way to the model process: the engine's ``ModelPort`` over a Unix socket.

``submit`` writes the item's pixels into shared memory (``worker.split.pixels``), sends the rest
and returns a Future that a reader thread resolves with the model process's answer. Before it
runs a batch, the model process says which of this process's items are in it. When the model
process goes away (killed, crashed, restarting):

- the items of the batch it was running fail with ``ModelProcessDied``: their start did not
  finish, as when a worker dies, and the task layer judges them so (a job that crashes the model
  process every time is counted, then dead-lettered: ``worker.delivery.policy``);
- every other item (waiting in it, or submitted meanwhile) is kept and sent again, with this
  process's "preparing" counts, once the client has connected to the new model process, which
  it does in the background.

Only ``stop`` fails the items still waiting, with ``ModelProcessGone`` (``Retryable``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import threading
import time
from collections import Counter
from collections.abc import Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from producer.protocol.errors import Retryable
from worker.delivery.policy import DiedRunning
from worker.split.pixels import Arena

log = logging.getLogger(__name__)


class ModelProcessGone(Retryable):
    """This intake process stopped while a job waited for the model process."""


class ModelProcessDied(ModelProcessGone, DiedRunning):
    """The model process died while it ran the batch that held this job."""


@dataclass(slots=True)
class _Request:
    future: Future[Any]
    blocks: list[SharedMemory]
    data: bytes
    """The pickled ``("submit", ...)`` message: sent again to a new model process."""
    model: str
    ends: bool
    """Its submit message ended this process's preparing of ``model``."""


def _hang_up(conn: Connection) -> None:
    """Close a connection that the reader thread may be blocked on. ``close`` alone does not
    wake a thread blocked in ``recv`` (Linux), which would wait for the model process to close
    its end, and the model process stops only after the intake processes: a stop of this
    process would wait out the reader's join timeout. ``shutdown`` wakes it with an EOF."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        with sock:
            sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def dumps(message: tuple[Any, ...]) -> bytes:
    """A message to the model process, as bytes. Plain pickle: multiprocessing's ForkingPickler
    would send a small tensor (a question's token ids) as a file descriptor that the receiver
    fetches from this process, which only a multiprocessing child of it may do, and the model
    process is not one. Small tensors travel by value; large ones are in shared memory. The
    model process sends with it too: ``Connection.send``'s pickler copies its table of reducers
    (torch's among them) for every message, and nothing on this socket needs them."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class RemoteModel:
    """The model process, as seen from an intake process."""

    def __init__(self, path: str, *, connect_s: float = 120.0) -> None:
        self.path = path
        self.connect_s = connect_s
        self.arena = Arena()
        self._ids = itertools.count()
        self._pending: dict[int, _Request] = {}
        self._running: set[int] = set()  # ids of the items in the batch being run
        self._lock = threading.Lock()  # _pending, _running
        # The connection, this process's "preparing" counts and what is sent: one at a time.
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._preparing: Counter[str] = Counter()
        # Messages wait here for the sender thread, which sends all that are waiting at once.
        self._outbox: list[bytes] = []
        self._posted = threading.Condition(self._send_lock)
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        self._sender: threading.Thread | None = None
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
        self._sender = threading.Thread(target=self._send, name="blipq-model-send", daemon=True)
        self._sender.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()
        with self._send_lock:
            conn, self._conn = self._conn, None
            self._outbox.clear()
            self._posted.notify()
        if conn is not None:
            _hang_up(conn)
        for thread in (self._reader, self._sender):
            if thread is not None:
                thread.join(timeout)
        self._fail_pending("this intake process is stopping; the job runs again")
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
        """The model process hears only when this process starts or stops preparing jobs of
        ``model`` (``("prep", model, +1 or -1)``; a submit message that leaves none says so
        itself): whether any are on their way is all it needs, and a busy process sends it
        next to nothing."""
        with self._send_lock:
            before = self._preparing[model]
            self._preparing[model] += delta
            busy = self._preparing[model] > 0
            if busy != (before > 0):  # without a connection, the state goes with the next one
                self._post(dumps(("prep", model, 1 if busy else -1)))

    def wake(self) -> None:
        """Nothing to do: the model process looks again when a preparation ends."""

    def submit(self, key: Hashable, item: Any) -> Future[Any]:
        rid = next(self._ids)
        future: Future[Any] = Future()
        packed, blocks = self.arena.pack(item)
        model = key[0]  # type: ignore[index]
        with self._send_lock:
            self._preparing[model] -= 1
            ends = self._preparing[model] <= 0
            data = dumps(("submit", rid, key, packed, ends))
            if self._stopping.is_set():
                self.arena.release(blocks)
                future.set_exception(ModelProcessGone("this intake process is stopping"))
                return future
            with self._lock:
                self._pending[rid] = _Request(future, blocks, data, model, ends)
            self.bytes_sent += len(data)
            self.items_sent += 1
            self._post(data)  # without a connection, it goes with the next one
        return future

    # --- the link ----------------------------------------------------------------------------

    def _post(self, data: bytes) -> bool:
        """Post a message for the current connection (the send lock held); False if there is
        none. The sender thread sends it, in order, with whatever else is waiting."""
        if self._conn is None:
            return False
        self._outbox.append(data)
        if len(self._outbox) == 1:
            self._posted.notify()
        return True

    def _send(self) -> None:
        """The sender thread: every message posted since its last send goes in one, as
        ``("many", [message, ...])`` when there are several. The threads that submit no longer
        wait for the socket (nor for each other at it), and under load the model process
        reads one message for many items."""
        while True:
            with self._posted:
                while not self._outbox and not self._stopping.is_set():
                    self._posted.wait()
                if self._stopping.is_set():
                    return
                posted, self._outbox = self._outbox, []
                conn = self._conn
            if conn is None:  # lost meanwhile: what was posted is sent again on reconnect
                continue
            try:
                conn.send_bytes(posted[0] if len(posted) == 1 else dumps(("many", posted)))
            except OSError:  # the model process is gone: the reader sees it
                pass
            except Exception:
                # Not lost, yet not sent: hang up, so the reader reconnects and every waiting
                # item goes again (a sender thread that died would leave them waiting).
                log.exception("sending to the model process failed; connecting again")
                _hang_up(conn)

    def _read(self) -> None:
        while not self._stopping.is_set():
            conn = self._conn
            try:
                if conn is None:
                    raise EOFError
                message = conn.recv()
            except (EOFError, OSError):
                if self._stopping.is_set():
                    return
                self._lost()
                continue
            if message[0] == "running":
                with self._lock:
                    self._running.update(rid for rid in message[1] if rid in self._pending)
            else:  # ("answers", [(id, ok, Done or exception), ...])
                for answer in message[1]:
                    self._resolve(*answer)

    def _lost(self) -> None:
        """The model process is gone: fail its running batch, keep the rest for its successor."""
        with self._send_lock:
            self._conn = None
            self._outbox.clear()  # its items are pending: sent again to the next one
        with self._lock:
            died, self._running = sorted(self._running), set()
        log.warning(
            "lost the model process: %d jobs of the batch it was running will run again "
            "(judged as a worker's death), the others wait for the new model process",
            len(died),
        )
        for rid in died:
            self._resolve(
                rid, False, ModelProcessDied("the model process died running this job's batch")
            )
        conn = self._connect(None)
        if conn is None:  # stopping
            return
        with self._send_lock:
            self._conn = conn
            sent = self._send_again()
        log.info("connected to the model process again; %d waiting items sent to it", sent)

    def _send_again(self) -> int:
        """To a new model process (the send lock held): whether this process is preparing
        jobs of each model, then the waiting items. A waiting item's submit message that ended
        the preparing counts as one more start of it."""
        with self._lock:
            waiting = sorted(self._pending.items())
        busy = Counter(model for model, count in self._preparing.items() if count > 0)
        counts = busy + Counter(request.model for _, request in waiting if request.ends)
        for model, count in counts.items():
            if count:
                self._post(dumps(("prep", model, count)))
        sent = 0
        for rid, request in waiting:
            if request.future.cancelled():  # its job gave up waiting (the time limit)
                self._resolve(rid, False, ModelProcessGone("cancelled"))
            elif self._post(request.data):
                sent += 1
        return sent

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
            request = self._pending.pop(rid, None)
            self._running.discard(rid)
        if request is None:
            return
        self.arena.release(request.blocks)
        with contextlib.suppress(InvalidStateError):  # the caller gave up on it (time limit)
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(value)

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            rids = list(self._pending)
        for rid in rids:
            self._resolve(rid, False, ModelProcessGone(message))

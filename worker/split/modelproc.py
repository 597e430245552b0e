"""The model process: ``python -m worker.split.modelproc SOCKET``.

It loads and warms up the served models, starts the model thread (``worker.modelhost``) and
serves intake processes over a Unix socket: each sends when it starts and stops preparing jobs
of a model (``("prep", model, +1 or -1)``) and prepared items (``("submit", id, key, item,
ends)``, pixels in shared memory; ``ends``: the intake process has no more jobs of model
``key[0]`` in preparation), several at once as ``("many", [pickled message, ...])``; the
answers go back as ``("answers", [(id, ok, Done or exception), ...])``, all that are ready in
one message, from a sender thread of that connection, so the model thread only runs batches.
Before it runs a batch, the model thread itself sends each intake process the ids of its items
in it (``("running", [id, ...])``): if the process dies in that batch, those jobs are the ones
whose start did not finish (a poison job is among them), the others were only waiting. It
prints ``model process ready`` once it listens. An intake process that goes away takes its
"preparing" counts with it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Hashable
from concurrent.futures import Future
from multiprocessing.connection import Connection, Listener
from typing import Any

from worker import heap
from worker.engine import configure_process, load_runners
from worker.metrics import Metrics
from worker.modelhost import ModelHost
from worker.models import Placement
from worker.settings import Settings
from worker.split.pixels import Attached, Stager
from worker.split.remote import dumps

log = logging.getLogger("blipq.modelproc")
READY = "model process ready"


class _Running:
    """Which intake process and request each queued item came from, so that the model thread can
    say, before it runs a batch, whose jobs are in it."""

    def __init__(self) -> None:
        self._origin: dict[int, tuple[_Intake, int]] = {}  # id(item) -> (intake, request id)
        self._lock = threading.Lock()

    def add(self, item: Any, intake: _Intake, rid: int) -> None:
        with self._lock:
            self._origin[id(item)] = (intake, rid)

    def discard(self, item: Any) -> None:
        with self._lock:
            self._origin.pop(id(item), None)

    def announce(self, items: list[Any]) -> None:
        """Tell each intake process which of its items this batch holds (the model thread
        sends it before the batch runs, so it is on the socket even if the batch kills us)."""
        by_intake: dict[_Intake, list[int]] = {}
        with self._lock:
            for item in items:
                origin = self._origin.get(id(item))
                if origin is not None:
                    by_intake.setdefault(origin[0], []).append(origin[1])
        for intake, rids in by_intake.items():
            intake.send(("running", rids))


class _Intake:
    """One connected intake process: its requests in, its answers out."""

    def __init__(
        self, conn: Connection, host: ModelHost, stager: Stager, running: _Running
    ) -> None:
        self.conn = conn
        self.host = host
        self.stager = stager
        self.running = running
        self.prep: Counter[str] = Counter()
        self.attached = Attached()
        self.answers: queue.SimpleQueue[tuple[int, bool, Any] | None] = queue.SimpleQueue()
        self._send_lock = threading.Lock()  # the sender thread and the model thread send

    def serve(self) -> None:
        sender = threading.Thread(target=self._send, name="blipq-answers", daemon=True)
        sender.start()
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "many":
                    for data in message[1]:
                        self._take(pickle.loads(data))
                else:
                    self._take(message)
        except (EOFError, OSError):
            pass
        finally:
            for model, count in self.prep.items():  # its jobs in preparation are gone
                if count:
                    self.host.preparing(model, -count)
            self.answers.put(None)
            sender.join(5)
            self.conn.close()

    def _take(self, message: tuple[Any, ...]) -> None:
        if message[0] == "submit":
            _, rid, key, item, ends = message
            self.prep[key[0]] -= ends
            self._submit(rid, key, item, int(ends))
        elif message[0] == "prep":
            self.prep[message[1]] += message[2]
            self.host.preparing(message[1], message[2])

    def _submit(self, rid: int, key: Hashable, item: Any, ends: int) -> None:
        try:
            staged = self.stager.stage(self.attached.unpack(item))
        except Exception as exc:
            self.host.preparing(key[0], -ends)  # type: ignore[index]
            self.answers.put((rid, False, exc))
            return
        self.running.add(staged, self, rid)
        try:
            future = self.host.submit(key, staged, ends=ends)
        except Exception as exc:
            self.running.discard(staged)
            self.answers.put((rid, False, exc))
            return

        def answer(done: Future[Any]) -> None:
            self.running.discard(staged)
            self.answers.put(_answer(rid, done))

        future.add_done_callback(answer)

    def send(self, message: tuple[Any, ...]) -> bool:
        """Send one message to the intake process; False if it is gone."""
        data = dumps(message)
        with self._send_lock:
            try:
                self.conn.send_bytes(data)
            except OSError:
                return False
        return True

    def _send(self) -> None:
        """Send the answers, every one that is ready in one message (a batch's answers are
        ready together): one pickling and one write, not one per item."""
        while (answer := self.answers.get()) is not None:
            ready = [answer]
            while True:
                try:
                    answer = self.answers.get_nowait()
                except queue.Empty:
                    break
                if answer is None:
                    self.answers.put(None)  # ends the loop once these are sent
                    break
                ready.append(answer)
            try:
                data = dumps(("answers", ready))
            except (pickle.PicklingError, TypeError, AttributeError):
                data = dumps(("answers", [_picklable(answer) for answer in ready]))
            try:
                with self._send_lock:
                    self.conn.send_bytes(data)
            except OSError:
                return


def _picklable(answer: tuple[int, bool, Any]) -> tuple[int, bool, Any]:
    """The answer, or an error saying why it cannot travel."""
    rid, _, value = answer
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        return rid, False, RuntimeError(f"{type(value).__name__}: {exc}")
    return answer


def _answer(rid: int, future: Future[Any]) -> tuple[int, bool, Any]:
    exc = future.exception()
    if exc is None:
        return rid, True, future.result()
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return rid, False, exc


def serve(settings: Settings, path: str) -> None:
    configure_process(settings)
    runners, load_s = load_runners(settings)
    metrics = Metrics()  # written for the launcher to serve (worker.metrics.serve_processes)
    for name, seconds in load_s.items():
        metrics.model_load.labels(name).set(seconds)
    host = ModelHost(settings, runners, metrics)
    placement = Placement.from_settings(settings)
    stager = Stager(placement.device, placement.dtype)
    running = _Running()
    host.on_batch = running.announce
    host.start()
    heap.settle()
    listener = Listener(path, family="AF_UNIX")
    os.chmod(path, 0o600)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        listener.close()  # accept() ends

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher stops it, after the intakes
    print(READY, flush=True)
    while not stopping.is_set():
        try:
            conn = listener.accept()
        except OSError:
            break
        intake = _Intake(conn, host, stager, running)
        threading.Thread(target=intake.serve, name="blipq-intake-conn", daemon=True).start()
    host.stop(timeout=30)  # what was submitted runs, and its answers go out
    time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m worker.split.modelproc SOCKET", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/model] %(message)s")
    serve(Settings(), args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An intake process's link to the model process when the model process dies: the jobs of the
batch it was running fail as unfinished starts, every other job goes to its successor."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import pytest

from worker.delivery.policy import DiedRunning
from worker.split.remote import ModelProcessDied, ModelProcessGone, RemoteModel


@pytest.fixture
def link(tmp_path: Path) -> Iterator[tuple[str, RemoteModel]]:
    path = str(tmp_path / "model.sock")
    model = RemoteModel(path, connect_s=5)
    yield path, model
    model.stop(timeout=5)


class _Messages:
    """The model process's end of the socket: one message at a time, the ones the intake
    process sent together (``("many", [pickled message, ...])``) one by one."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.together: list[bool] = []  # per read from the socket: several messages in it
        self._waiting: list[object] = []

    def recv(self) -> object:
        if not self._waiting:
            message = self.conn.recv()
            many = message[0] == "many"
            self.together.append(many)
            self._waiting = [pickle.loads(m) for m in message[1]] if many else [message]
        return self._waiting.pop(0)

    def send(self, message: object) -> None:
        self.conn.send(message)

    def close(self) -> None:
        self.conn.close()


def _accept(path: str) -> tuple[Listener, _Messages]:
    listener = Listener(path, family="AF_UNIX")
    return listener, _Messages(listener.accept())


def _serve(path: str, model: RemoteModel) -> tuple[Listener, _Messages]:
    """A model process listening at ``path``, and ``model`` started and connected to it."""
    listener = Listener(path, family="AF_UNIX")
    model.start()  # it connects before it returns
    return listener, _Messages(listener.accept())


def test_the_running_batch_fails_as_died_and_the_waiting_items_go_to_the_successor(
    link: tuple[str, RemoteModel],
) -> None:
    path, model = link
    listener, conn = _serve(path, model)
    model.preparing("m", 4)
    running = model.submit(("m", "k"), "in the batch")
    waiting = model.submit(("m", "k"), "queued behind it")
    assert conn.recv() == ("prep", "m", 1)  # it is preparing jobs of "m": not how many
    first, second = conn.recv(), conn.recv()
    assert (first[0], first[3], second[3]) == ("submit", "in the batch", "queued behind it")
    # The model thread says which items its batch holds, runs it, and the process dies.
    conn.send(("running", [first[1]]))
    conn.close()
    listener.close()

    with pytest.raises(ModelProcessDied) as died:
        running.result(timeout=5)
    assert isinstance(died.value, DiedRunning)
    assert not waiting.done()
    meanwhile = model.submit(("m", "k"), "sent while it restarts")

    listener, conn = _accept(path)  # the new model process
    try:
        # Whether this process is preparing jobs of each model first (it still is: 4 started,
        # 3 submitted), then every waiting item, in order.
        assert conn.recv() == ("prep", "m", 1)
        again = [conn.recv() for _ in range(2)]
        assert [m[3] for m in again] == ["queued behind it", "sent while it restarts"]
        conn.send(("answers", [(again[0][1], True, "output")]))
        assert waiting.result(timeout=5) == "output"
        model.stop(timeout=5)
        # Only stopping fails what still waits, and not as a death in its batch.
        with pytest.raises(ModelProcessGone) as gone:
            meanwhile.result(timeout=5)
        assert not isinstance(gone.value, DiedRunning)
    finally:
        conn.close()
        listener.close()


def test_answers_before_the_death_leave_nothing_to_blame(link: tuple[str, RemoteModel]) -> None:
    path, model = link
    listener, conn = _serve(path, model)
    model.preparing("m", 1)  # as the engine does before each submit
    done = model.submit(("m", "k"), "answered")
    assert conn.recv() == ("prep", "m", 1)
    message = conn.recv()
    conn.send(("running", [message[1]]))
    conn.send(("answers", [(message[1], True, "output")]))
    assert done.result(timeout=5) == "output"
    conn.close()
    listener.close()
    listener, conn = _accept(path)
    try:
        model.preparing("m", 1)
        later = model.submit(("m", "k"), "after the restart")
        # Sent now, or with the waiting items once connected: the same messages.
        assert conn.recv() == ("prep", "m", 1)
        assert conn.recv()[3:] == ("after the restart", True)  # and none of "m" left
        assert not later.done()
    finally:
        conn.close()
        listener.close()


class _FakeIntake:
    def __init__(self) -> None:
        self.sent: list[tuple[object, ...]] = []

    def send(self, message: tuple[object, ...]) -> bool:
        self.sent.append(message)
        return True


def test_the_model_process_names_each_intake_processes_items_before_a_batch_runs() -> None:
    from worker.split.modelproc import _Running

    one, two = _FakeIntake(), _FakeIntake()
    running = _Running()
    items = [object() for _ in range(3)]
    running.add(items[0], one, 7)  # type: ignore[arg-type]
    running.add(items[1], two, 1)  # type: ignore[arg-type]
    running.add(items[2], one, 8)  # type: ignore[arg-type]
    running.announce(items)
    assert one.sent == [("running", [7, 8])] and two.sent == [("running", [1])]
    running.discard(items[1])  # answered
    running.announce([items[1]])
    assert two.sent == [("running", [1])]


def test_stop_does_not_wait_for_the_model_process_to_hang_up(
    link: tuple[str, RemoteModel],
) -> None:
    """The launcher stops the model process only after the intake processes: an intake
    process's stop must not wait for the model process's end of the socket."""
    path, model = link
    listener, conn = _serve(path, model)
    try:
        time.sleep(0.3)  # the reader thread is blocked in recv
        started = time.monotonic()
        model.stop(timeout=10)
        assert time.monotonic() - started < 5
        assert model._reader is not None and not model._reader.is_alive()
    finally:
        conn.close()
        listener.close()


def test_messages_posted_together_go_in_one_read_in_order(link: tuple[str, RemoteModel]) -> None:
    from worker.split.remote import dumps

    path, model = link
    listener, conn = _serve(path, model)
    try:
        with model._posted:  # the sender thread waits: all three are posted before it sends
            for n in range(3):
                assert model._post(dumps(("prep", f"m{n}", 1)))
        assert [conn.recv() for _ in range(3)] == [("prep", f"m{n}", 1) for n in range(3)]
        assert conn.together == [True]
        model.preparing("m", 1)  # alone: sent as it is
        assert conn.recv() == ("prep", "m", 1)
        assert conn.together == [True, False]
    finally:
        conn.close()
        listener.close()


def test_a_failed_send_reconnects_and_sends_the_waiting_items_again(
    link: tuple[str, RemoteModel],
) -> None:
    path, model = link
    listener, conn = _serve(path, model)
    broken = model._conn
    assert broken is not None

    def fail(data: bytes) -> None:
        raise ValueError("not sendable")

    broken.send_bytes = fail  # type: ignore[method-assign]
    model.preparing("m", 1)
    waiting = model.submit(("m", "k"), "sent again")
    with pytest.raises(EOFError):  # the link was hung up, not left silent
        conn.recv()
    conn.close()
    conn = _Messages(listener.accept())  # the client connects again
    try:
        assert conn.recv() == ("prep", "m", 1)
        again = conn.recv()
        assert again[3:] == ("sent again", True)
        conn.send(("answers", [(again[1], True, "output")]))
        assert waiting.result(timeout=5) == "output"
    finally:
        conn.close()
        listener.close()

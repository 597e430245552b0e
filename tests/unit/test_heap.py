"""worker.heap: start-up objects go to the permanent generation; later ones are collected."""

from __future__ import annotations

import gc
import weakref

from worker import heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_settle_freezes_what_exists_and_later_cycles_are_still_collected() -> None:
    before = _Node()
    try:
        frozen = heap.settle()
        assert frozen == gc.get_freeze_count() > 0
        tracked = {id(o) for o in gc.get_objects()}
        assert id(before) not in tracked  # frozen: no collection walks it
        later = _Node()
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None  # a cycle made after start-up is freed as before
    finally:
        gc.unfreeze()

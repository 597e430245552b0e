"""The garbage collector after start-up: what was loaded then is never scanned again.

A worker imports torch, transformers and Celery and loads its models before it takes a job:
some 220,000-280,000 objects that live as long as the process. CPython's cyclic collector walks
every tracked object of a generation it collects, so each full collection walked all of them,
and under a full queue of null-model jobs `perf` put the collector (``gc_collect_main``,
``visit_decref``, ``visit_reachable``) at about 5 % of an intake process's CPU. ``settle``
collects once, then moves every surviving object to the permanent generation
(``gc.freeze``), which no collection visits; objects made per job are collected as before.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle() -> int:
    """Collect, then freeze what is left (start-up objects); return how many were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("gc: %d start-up objects frozen (never scanned again)", frozen)
    return frozen

"""blipq worker: Celery workers that keep BLIP models loaded and run jobs in dynamic batches."""

from __future__ import annotations

from worker.batcher import Batcher, BatchPolicy
from worker.settings import Settings

__all__ = ["BatchPolicy", "Batcher", "Settings"]

"""Model families: each module loads one family, prepares items, and runs a batch.

Adding a job kind is one module here plus its job model in ``producer.jobs``.
"""

from __future__ import annotations

from worker.models.base import ModelRunner, Placement, load_runner

__all__ = ["ModelRunner", "Placement", "load_runner"]

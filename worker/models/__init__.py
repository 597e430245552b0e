"""Model families: each module loads one family, prepares items, and runs a batch.

Adding a family is one module here, its entry in ``worker.models.registry``, and its job model
in ``producer.protocol.jobs``.
"""

from __future__ import annotations

from worker.models.base import ModelRunner, Placement

__all__ = ["ModelRunner", "Placement"]

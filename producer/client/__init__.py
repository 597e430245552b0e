"""Sending jobs and reading their results: ``Sender``, ``Client``, ``AsyncClient``."""

from __future__ import annotations

from producer.client.aio import AsyncClient
from producer.client.sync import Client

__all__ = ["AsyncClient", "Client"]

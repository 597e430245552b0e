"""The ``blipq`` command."""

from __future__ import annotations

from producer.cli.blipq import build_parser, main

__all__ = ["build_parser", "main"]

"""Balcony: add trained early exits to a frozen decoder-only language model."""

from __future__ import annotations

__version__ = "0.1.0"

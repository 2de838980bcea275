"""Preset pipelines. Each reads top to bottom, one line per pass, with why it sits there.

Passes join these presets as their issues land (folding, fusion, pruning, quantization).
"""

from __future__ import annotations

__all__ = ["DEFAULT_PIPELINE", "PRESETS"]

DEFAULT_PIPELINE = ",".join(
    [
        # First: drop Identity nodes, duplicate weights and dead code that export leaves
        # behind, so every later pass sees the smallest graph and its counts mean something.
        "cleanup",
    ]
)

PRESETS = {"default": DEFAULT_PIPELINE}

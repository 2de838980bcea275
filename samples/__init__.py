"""Bundled sample models, small real data, and an example custom pass.

The samples register themselves on the first call of ``available_samples`` or ``get_sample``.
"""

from __future__ import annotations

from onnxforge.samples.catalog import Sample, available_samples, get_sample, register_sample

__all__ = ["Sample", "available_samples", "get_sample", "register_sample"]

"""Bundled sample models, small real data, and an example custom pass."""

from __future__ import annotations

from onnxforge.samples import seed_cnn as _seed_cnn  # noqa: F401  (registers the sample)
from onnxforge.samples.catalog import Sample, available_samples, get_sample, register_sample

__all__ = ["Sample", "available_samples", "get_sample", "register_sample"]

"""Frontend: PyTorch -> ONNX export, model specs, export checks."""

from __future__ import annotations

from onnxforge.frontend.export import EXPORT_CHECK_META_KEY, export
from onnxforge.frontend.specs import resolve_spec

__all__ = ["export", "resolve_spec", "EXPORT_CHECK_META_KEY"]

"""The parts of the ``quantize`` pass, one module each.

CPU defaults (``cpu``), data sources (``data``), graph preparation (``prepare``), SmoothQuant
(``smooth``), ONNX Runtime's quantizer at the proto boundary (``engine``), metrics
(``metrics``), the accuracy-aware search (``search``) and the report (``report``).
:mod:`onnxforge.passes.quantize` puts them together.
"""

from __future__ import annotations

__all__: list[str] = []

"""onnxforge: a compiler-style graph optimization pipeline for ONNX inference.

The public API::

    import onnxforge

    model = onnxforge.export("seed-cnn")                 # PyTorch -> onnx_ir.Model, checked
    result = onnxforge.optimize(model, "cleanup", verify="numeric")
    onnxforge.save(result.model, "out.onnx")             # atomic, with provenance
    model = onnxforge.load("out.onnx")
    table = onnxforge.compare("digits-cnn", ["cleanup,fuse", "fuse,cleanup"])  # orderings
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxforge.compare import compare  # noqa: E402
from onnxforge.errors import InputError, OnnxforgeError, PassError, VerificationError  # noqa: E402
from onnxforge.io import load, save  # noqa: E402
from onnxforge.optimize import optimize  # noqa: E402


def export(*args, **kwargs):
    """Export a PyTorch module or spec to an ``onnx_ir.Model``; see ``onnxforge.frontend.export``.

    Imported on first use, so that ``import onnxforge`` does not pay for importing torch.
    """
    from onnxforge.frontend import export as _export

    return _export(*args, **kwargs)


__all__ = [
    "__version__",
    "load",
    "save",
    "optimize",
    "compare",
    "export",
    "OnnxforgeError",
    "InputError",
    "PassError",
    "VerificationError",
]

"""Passes: the pass contract, registry, textual pipelines, manager, instruments, pass library.

Importing this package registers onnxforge's own passes; third-party passes come in through the
``onnxforge.passes`` entry-point group.
"""

from __future__ import annotations

# Importing a pass module registers its pass.
from onnxforge.passes import cleanup as _cleanup  # noqa: F401
from onnxforge.passes import cuda_layout as _cuda_layout  # noqa: F401
from onnxforge.passes import fold_constants as _fold_constants  # noqa: F401
from onnxforge.passes import fp16 as _fp16  # noqa: F401
from onnxforge.passes import fuse as _fuse  # noqa: F401
from onnxforge.passes import prune as _prune  # noqa: F401
from onnxforge.passes import quantize as _quantize  # noqa: F401
from onnxforge.passes.base import FunctionalPass, OptionSpec, Pass, PassBase, PassResult, Semantics
from onnxforge.passes.bisect import BisectResult, bisect_pipeline
from onnxforge.passes.cleanup import CleanupPass
from onnxforge.passes.instruments import (
    DEFAULT_TOLERANCES,
    Bisect,
    CrashReproducer,
    Explain,
    Ledger,
    PrintIR,
    Timing,
    VerifyNumerics,
    VerifyStructure,
)
from onnxforge.passes.manager import Instrument, PassManager, PassRecord, PipelineResult
from onnxforge.passes.pipeline import (
    canonical_pipeline,
    format_pass,
    format_pipeline,
    parse_pipeline,
)
from onnxforge.passes.registry import available_passes, get_pass, register

__all__ = [
    "Pass",
    "FunctionalPass",
    "PassBase",
    "PassResult",
    "Semantics",
    "OptionSpec",
    "register",
    "get_pass",
    "available_passes",
    "parse_pipeline",
    "format_pipeline",
    "format_pass",
    "canonical_pipeline",
    "PassManager",
    "PassRecord",
    "PipelineResult",
    "Instrument",
    "Timing",
    "Ledger",
    "VerifyStructure",
    "VerifyNumerics",
    "Bisect",
    "CrashReproducer",
    "PrintIR",
    "Explain",
    "DEFAULT_TOLERANCES",
    "bisect_pipeline",
    "BisectResult",
    "CleanupPass",
]

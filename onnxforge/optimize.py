"""``optimize``: run a pipeline over a model with the verification the caller asks for."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.errors import InputError
from onnxforge.io import PIPELINE_KEY, load
from onnxforge.passes import (
    CrashReproducer,
    Instrument,
    Ledger,
    PassManager,
    PipelineResult,
    Timing,
    VerifyNumerics,
    VerifyStructure,
)
from onnxforge.passes.pipeline import PipelineLike

__all__ = ["optimize", "VERIFY_LEVELS", "VERIFY_BATCH"]

VERIFY_LEVELS = ("none", "structure", "numeric")
# Random verification inputs use batch 2, so that a pass that breaks a dynamic batch axis
# (a Reshape baked to batch 1, say) shows up as drift instead of passing by accident.
VERIFY_BATCH = 2


def default_runner(ep: str = "cpu"):
    """The runner VerifyNumerics uses: a fresh ONNX Runtime session per model."""
    return Session.runner(ep=ep)


def optimize(
    model: ir.Model | str | os.PathLike[str] | bytes,
    pipeline: PipelineLike,
    *,
    verify: Literal["none", "structure", "numeric"] = "none",
    inputs: Mapping[str, np.ndarray] | None = None,
    ep: str = "cpu",
    budget: float | None = None,
    reproducer_dir: str | os.PathLike[str] | None = None,
    instruments: Sequence[Instrument] = (),
) -> PipelineResult:
    """Run ``pipeline`` over ``model`` (rewritten in place; pass ``model.clone()`` to keep it).

    ``verify="structure"`` checks every pass's result with the ONNX checker and strict shape
    inference; ``"numeric"`` also runs the model with ONNX Runtime on ``ep`` before and after
    every pass (on ``inputs``, or seeded random inputs at batch 2) and fails a pass whose
    outputs move more than its semantics allow; lossy passes are held to ``budget`` (relative
    L2 against the input model). The result records one ledger entry per pass, and its model
    carries the pipeline in ``metadata_props["onnxforge.pipeline"]``.
    """
    if verify not in VERIFY_LEVELS:
        raise InputError(f"unknown verify level '{verify}'", hint=f"use {', '.join(VERIFY_LEVELS)}")
    if not isinstance(model, ir.Model):
        model = load(model)
    chosen: list[Instrument] = [Ledger()]
    if verify in ("structure", "numeric"):
        chosen.append(VerifyStructure())
    if verify == "numeric":
        if inputs is None:
            inputs = make_inputs(model, batch=VERIFY_BATCH)
        chosen.append(VerifyNumerics(default_runner(ep), inputs, compare_outputs, budget=budget))
    if reproducer_dir is not None:
        chosen.append(CrashReproducer(reproducer_dir))
    chosen += list(instruments)
    chosen.append(Timing())  # last, so it wraps the pass alone (see PassManager)
    result = PassManager(pipeline, chosen).run(model)
    previous = result.model.metadata_props.get(PIPELINE_KEY)
    result.model.metadata_props[PIPELINE_KEY] = (
        f"{previous},{result.pipeline}" if previous else result.pipeline
    )
    return result

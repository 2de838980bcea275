"""PyTorch -> ONNX export with ``torch.onnx.export(dynamo=True)``, checked against ONNX Runtime.

By default the exporter's own graph optimisation is off: optimisation is the pipeline's job,
so that orderings stay comparable. When the dynamo exporter fails, the TorchScript exporter is
tried, with a warning that says why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import torch

from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError, OnnxforgeError
from onnxforge.frontend.specs import resolve_spec

__all__ = ["export", "EXPORT_CHECK_TOLERANCE", "EXPORT_CHECK_META_KEY", "BATCH_DIM_NAME"]

logger = logging.getLogger(__name__)

# Largest relative L2 error between PyTorch and ONNX Runtime outputs that an export may show.
EXPORT_CHECK_TOLERANCE = 1e-4
# The check's figures are kept in the IR's in-memory metadata under this key.
EXPORT_CHECK_META_KEY = "onnxforge.export_check"
BATCH_DIM_NAME = "batch"


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's own chatter (missing torchvision ops, deprecation notices)."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def _export_dynamo(module, inputs, *, dynamic_batch: bool, opset: int | None, optimize: bool):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH_DIM_NAME)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(
        module,
        inputs,
        dynamo=True,
        optimize=optimize,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
        report=False,
    )
    return program.model


def _export_torchscript(module, inputs, *, dynamic_batch: bool, opset: int | None):
    names = [f"input_{i}" for i in range(len(inputs))]
    buffer = io.BytesIO()
    axes = {name: {0: BATCH_DIM_NAME} for name in names} if dynamic_batch else None
    torch.onnx.export(
        module,
        inputs,
        buffer,
        dynamo=False,
        input_names=names,
        dynamic_axes=axes,
        opset_version=opset or 17,
    )
    return ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))


def _check(module: torch.nn.Module, model: ir.Model, inputs: Sequence[torch.Tensor]) -> dict:
    with torch.no_grad():
        expected = module(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    feed = {v.name: t.numpy() for v, t in zip(model.graph.inputs, inputs, strict=True)}
    got = Session(model).run(feed)
    comparison = compare_outputs([t.detach().numpy() for t in expected], got)
    if not (comparison.finite and comparison.rel_l2 <= EXPORT_CHECK_TOLERANCE):
        raise OnnxforgeError(
            f"export check failed: ONNX Runtime differs from PyTorch by relative L2 "
            f"{comparison.rel_l2:.3g} (max abs {comparison.max_abs:.3g})",
            hint="the exported graph is wrong; try --opset or the other exporter",
        )
    return comparison.as_dict()


def export(
    module_or_spec: torch.nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    optimize: bool = False,
) -> ir.Model:
    """Export a module (or a spec: sample name or ``package.module:factory``) to an IR model.

    The result is checked against PyTorch on the example inputs with ONNX Runtime; the check's
    figures (max_abs, rel_l2, cosine, ...) are in ``model.meta["onnxforge.export_check"]``.
    """
    if isinstance(module_or_spec, str):
        module, spec_inputs = resolve_spec(module_or_spec)
        example_inputs = example_inputs if example_inputs is not None else spec_inputs
    else:
        module = module_or_spec
    if example_inputs is None:
        raise InputError(
            "example inputs are needed to export this module",
            hint="pass example_inputs, or make the factory return them",
        )
    inputs = tuple(example_inputs)
    module = module.eval()
    fallback_reason = None
    with _quiet_exporter():
        try:
            model = _export_dynamo(
                module, inputs, dynamic_batch=dynamic_batch, opset=opset, optimize=optimize
            )
        except Exception as error:
            fallback_reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if fallback_reason is not None:
        message = (
            f"the dynamo exporter failed ({fallback_reason}); falling back to the "
            "TorchScript exporter"
        )
        warnings.warn(message, stacklevel=2)
        logger.warning("%s", message)
        with _quiet_exporter():
            model = _export_torchscript(module, inputs, dynamic_batch=dynamic_batch, opset=opset)
    model.meta[EXPORT_CHECK_META_KEY] = _check(module, model, inputs)
    return model

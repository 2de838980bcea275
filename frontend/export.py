"""PyTorch -> ONNX export with ``torch.onnx.export(dynamo=True)``, checked against ONNX Runtime.

By default the exporter's own graph optimisation is off: optimisation is the pipeline's job,
so that orderings stay comparable. When the dynamo exporter fails, the TorchScript exporter is
tried, with a warning that says why. Every export is checked: PyTorch against ONNX Runtime on
the example inputs and, when the batch is dynamic, at a second batch size; a check past the
spec's tolerance is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import onnx
import onnx_ir as ir
import torch

from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError, VerificationError, first_line
from onnxforge.frontend.specs import DEFAULT_EXPORT_TOLERANCE, ResolvedSpec, resolve_spec

__all__ = [
    "export",
    "ExportReport",
    "EXPORT_CHECK_META_KEY",
    "BATCH_DIM_NAME",
    "DEFAULT_EXPORT_TOLERANCE",
]

logger = logging.getLogger(__name__)

# The check's figures are kept in the IR's in-memory metadata under this key.
EXPORT_CHECK_META_KEY = "onnxforge.export_check"
BATCH_DIM_NAME = "batch"


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """How an export went: exporter, time, and the check at each batch size."""

    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    tolerance: float
    checks: list[dict]  # one per batch size: {"batch", "max_abs", "rel_l2", "cosine", ...}
    nodes: int

    def as_dict(self) -> dict:
        """JSON-ready; ``max_abs`` and ``rel_l2`` at the top are the worst over the checks."""
        return {
            **dataclasses.asdict(self),
            "max_abs": max(c["max_abs"] for c in self.checks),
            "rel_l2": max(c["rel_l2"] for c in self.checks),
        }


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


def _argument_names(module: torch.nn.Module, count: int) -> list[str]:
    parameters = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return parameters[:count] if len(parameters) >= count else [f"input_{i}" for i in range(count)]


def _axes(
    names: Sequence[str], dynamic_batch: bool, dynamic_axes: Mapping[str, Mapping[int, str]] | None
) -> dict[str, dict[int, str]]:
    """Symbolic axes per argument: the batch axis plus the ones asked for."""
    axes: dict[str, dict[int, str]] = {name: {} for name in names}
    if dynamic_batch:
        for name in names:
            axes[name][0] = BATCH_DIM_NAME
    for name, extra in (dynamic_axes or {}).items():
        if name not in axes:
            raise InputError(
                f"dynamic_axes names '{name}', which is not an input",
                hint=f"inputs: {', '.join(names)}",
            )
        axes[name].update(extra)
    return axes


def _export_dynamo(resolved, inputs, names, axes, *, opset, optimize) -> ir.Model:
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = None
    if resolved.program is None and any(axes.values()):
        dynamic_shapes = {
            name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in a.items()}
            or None
            for name, a in axes.items()
        }
    program = torch.onnx.export(
        resolved.program if resolved.program is not None else resolved.module,
        inputs,
        dynamo=True,
        optimize=optimize,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
        report=False,
    )
    return program.model


def _export_torchscript(module, inputs, names, axes, *, opset) -> ir.Model:
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        inputs,
        buffer,
        dynamo=False,
        input_names=list(names),
        dynamic_axes={n: dict(a) for n, a in axes.items() if a} or None,
        opset_version=opset or 17,
    )
    return ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))


def _check(module, model: ir.Model, inputs: Sequence[torch.Tensor], tolerance: float) -> dict:
    try:
        with torch.no_grad():
            expected = module(*inputs)
    except Exception as error:
        first = first_line(error)
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputError(
            f"PyTorch cannot run the model on inputs of shape {shapes}: {first}",
            hint="the model (or the .pt2 archive) may fix these shapes; leave --batch and "
            "--input-shape at what it was made for",
        ) from None
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    names = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    feed = {name: t.detach().numpy() for name, t in zip(names, inputs, strict=True)}
    got = Session(model).run(feed)
    comparison = compare_outputs([t.detach().numpy() for t in expected], got)
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    if not (comparison.finite and comparison.rel_l2 <= tolerance):
        raise VerificationError(
            f"export check failed at batch {batch}: ONNX Runtime differs from PyTorch by "
            f"relative L2 {comparison.rel_l2:.3g} (max abs {comparison.max_abs:.3g}, "
            f"tolerance {tolerance:g})",
            pass_name="export",
            index=0,
            hint="the exported graph is wrong; try another --opset",
        )
    return {"batch": batch, **comparison.as_dict()}


def _second_batch(
    inputs: tuple[torch.Tensor, ...], make_inputs: Callable[[int], tuple] | None
) -> tuple[torch.Tensor, ...]:
    """Inputs at a different batch size, from the spec when it can make them.

    Otherwise the first row is repeated.
    """
    batch = int(inputs[0].shape[0])
    if make_inputs is not None:
        return tuple(make_inputs(batch + 1))
    return tuple(torch.cat([t, t[:1]]) for t in inputs)


def _at_batch(resolved: ResolvedSpec, batch: int) -> tuple[torch.Tensor, ...]:
    if batch < 1:
        raise InputError(f"the batch size must be at least 1, got {batch}")
    if resolved.make_inputs is not None:
        return tuple(resolved.make_inputs(batch))
    inputs = resolved.example_inputs
    rows = torch.arange(batch) % int(inputs[0].shape[0])
    return tuple(t[rows] for t in inputs)


def _with_shapes(
    inputs: tuple[torch.Tensor, ...], names: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of the given shapes, keeping each input's dtype and value range."""
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise InputError(
            f"--input-shape names {', '.join(unknown)}, not an input of the model",
            hint=f"inputs: {', '.join(names)}",
        )
    generator = torch.Generator().manual_seed(0)
    replaced = []
    for name, tensor in zip(names, inputs, strict=True):
        if name not in shapes:
            replaced.append(tensor)
            continue
        shape = tuple(int(d) for d in shapes[name])
        if tensor.dtype.is_floating_point:
            replaced.append(torch.randn(shape, generator=generator).to(tensor.dtype))
        else:
            low, high = int(tensor.min()), int(tensor.max()) + 1
            replaced.append(torch.randint(low, high, shape, generator=generator).to(tensor.dtype))
    return tuple(replaced)


def export(
    module_or_spec: torch.nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    optimize: bool = False,
    tolerance: float | None = None,
    batch: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ir.Model:
    """Export a module, or a spec (see ``onnxforge.frontend.specs``), to an IR model.

    ``dynamic_axes`` names further symbolic axes per forward argument, e.g.
    ``{"input_ids": {1: "sequence"}}``; the first axis is the symbolic ``batch`` unless
    ``dynamic_batch=False``. ``batch`` sets the example batch size and ``input_shapes``
    replaces named example inputs by seeded random ones of the given shapes (with a static
    batch these shapes are baked into the graph). The result is checked against PyTorch with
    ONNX Runtime; the :class:`ExportReport` (as a dict) is in
    ``model.meta["onnxforge.export_check"]``.
    """
    if isinstance(module_or_spec, torch.nn.Module):
        resolved = ResolvedSpec(name=type(module_or_spec).__name__, module=module_or_spec)
    else:
        resolved = resolve_spec(module_or_spec)
    if example_inputs is not None:
        resolved.example_inputs, resolved.make_inputs = tuple(example_inputs), None
    if resolved.example_inputs is None:
        raise InputError(
            f"example inputs are needed to export {resolved.name}",
            hint="pass example_inputs, or make the factory return (module, inputs)",
        )
    if batch is not None:
        resolved.example_inputs = _at_batch(resolved, batch)
    module = resolved.module.eval() if resolved.program is None else resolved.module
    names = _argument_names(resolved.module, len(resolved.example_inputs))
    if input_shapes:
        resolved.example_inputs = _with_shapes(resolved.example_inputs, names, input_shapes)
        resolved.make_inputs = None
    inputs = resolved.example_inputs
    axes = _axes(names, dynamic_batch, {**(resolved.dynamic_axes or {}), **(dynamic_axes or {})})
    start = time.perf_counter()
    exporter, fallback_reason = "dynamo", None
    with _quiet_exporter():
        try:
            model = _export_dynamo(resolved, inputs, names, axes, opset=opset, optimize=optimize)
        except Exception as error:
            fallback_reason = first_line(error)
    if fallback_reason is not None:
        message = (
            f"the dynamo exporter failed ({fallback_reason}); falling back to the "
            "TorchScript exporter"
        )
        warnings.warn(message, stacklevel=2)
        logger.warning("%s", message)
        exporter = "torchscript"
        with _quiet_exporter():
            model = _export_torchscript(module, inputs, names, axes, opset=opset)
    seconds = time.perf_counter() - start
    limit = tolerance if tolerance is not None else resolved.tolerance
    checks = [_check(module, model, inputs, limit)]
    if dynamic_batch and resolved.program is None:
        checks.append(_check(module, model, _second_batch(inputs, resolved.make_inputs), limit))
    report = ExportReport(exporter, seconds, limit, checks, sum(1 for _ in model.graph.all_nodes()))
    model.meta[EXPORT_CHECK_META_KEY] = report.as_dict()
    logger.info(
        "exported %s with %s in %.1f s; check rel-L2 %.2e",
        resolved.name,
        exporter,
        seconds,
        report.as_dict()["rel_l2"],
    )
    return model

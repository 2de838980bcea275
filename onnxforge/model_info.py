"""What ``onnxforge inspect`` shows: versions, signature, op histogram, sizes, provenance."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxforge.io import PIPELINE_KEY, VERSION_KEY
from onnxforge.passes.base import CUDA_PROVIDER_OPTIONS_KEY
from onnxforge.passes.statistics import model_stats

__all__ = ["ModelInfo", "describe_model"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A model summary, JSON-ready through ``as_dict``."""

    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    nodes: int
    ops: dict[str, int]
    parameters: int
    parameter_bytes: int
    pipeline: str | None
    onnxforge_version: str | None
    # CUDA provider options a pass recorded for the backend (JSON text), or None
    cuda_provider_options: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return dataclasses.asdict(self)


def _signature(values) -> list[dict[str, Any]]:
    return [
        {
            "name": value.name,
            "dtype": value.dtype.name if value.dtype is not None else None,
            "shape": [d if isinstance(d, int) else str(d) for d in value.shape]
            if value.shape is not None
            else None,
        }
        for value in values
    ]


def describe_model(model: ir.Model) -> ModelInfo:
    """Summarise ``model`` without materialising its weights."""
    stats = model_stats(model)
    initializers = model.graph.initializers
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return ModelInfo(
        ir_version=model.ir_version,
        opsets=dict(sorted((d or "ai.onnx", v) for d, v in model.opset_imports.items())),
        producer=producer,
        inputs=_signature(v for v in model.graph.inputs if v.name not in initializers),
        outputs=_signature(model.graph.outputs),
        nodes=stats.nodes,
        ops=dict(sorted(stats.ops.items(), key=lambda item: (-item[1], item[0]))),
        parameters=stats.parameters,
        parameter_bytes=stats.parameter_bytes,
        pipeline=model.metadata_props.get(PIPELINE_KEY),
        onnxforge_version=model.metadata_props.get(VERSION_KEY),
        cuda_provider_options=model.metadata_props.get(CUDA_PROVIDER_OPTIONS_KEY),
    )

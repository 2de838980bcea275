"""Preset pipelines. Each reads top to bottom, one line per pass, with why it sits there.

Pruning, quantization and fp16 are not in the default: they lose accuracy, so a user asks for
them (with a budget) rather than getting them silently.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PIPELINE", "CUDA_PIPELINE", "PRESETS", "TARGET_PRESETS"]

DEFAULT_PIPELINE = ",".join(
    [
        # First: evaluate what is constant (the exporter's shape arithmetic, weight
        # transposes), so that the patterns below see constants where the math has them.
        "fold-constants",
        # Then drop what folding and export leave behind: Identity and no-op nodes, duplicate
        # weights, common subexpressions, dead nodes. Fusion patterns match a clean graph.
        "cleanup",
        # Last: fuse Conv+BatchNorm, bias and activations, LayerNorm, GELU and attention into
        # ONNX Runtime's fused kernels. Fused ops are opaque to the passes above, so they go last.
        "fuse",
    ]
)

CUDA_PIPELINE = ",".join(
    [
        "fold-constants",  # as above
        "cleanup",  # as above
        "fuse{target=cuda}",  # only the fused ops ONNX Runtime's CUDA provider has kernels for
        # half precision for tensor cores, fused ops included; sensitive ops stay float32
        "fp16{target=cuda}",
        # after fp16, whose float16 convolutions it reshapes for cuDNN: stems over few channels
        # as space-to-depth, ReLU after max-pool, spatial means on cuBLAS
        "cuda-layout",
    ]
)

PRESETS = {"default": DEFAULT_PIPELINE, "cuda": CUDA_PIPELINE}
# `onnxforge optimize --target T` without a pipeline starts from this preset.
TARGET_PRESETS = {"cpu": "default", "cuda": "cuda"}

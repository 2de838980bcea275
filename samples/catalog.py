"""The catalogue of bundled sample models, looked up by name.

Sample modules are imported on the first look-up, not when ``onnxforge.samples`` is imported,
so that importing the package (the example custom pass lives in it) does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal

from onnxforge.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Sample", "register_sample", "get_sample", "available_samples"]


@dataclasses.dataclass(frozen=True)
class Sample:
    """A bundled model: a factory for the module (weights included) and its example inputs."""

    name: str
    summary: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    # Symbolic axes other than the batch, per forward argument: {"input_ids": {1: "sequence"}}.
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
    # Largest relative L2 error between PyTorch and ONNX Runtime accepted at export.
    export_tolerance: float = 1e-4
    # Batches of inputs (dicts keyed by ONNX input name) for calibrating quantization.
    calibration_data: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    # Held-out inputs and, for classifiers, their labels (None where the metric compares
    # against the float model's outputs instead).
    evaluation_data: Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]] | None = None
    # How accuracy is measured on the evaluation data.
    metric: Literal["top1", "cosine"] = "cosine"
    # Labelled training inputs (keyed by ONNX input name) and labels, for fine-tuning and
    # distillation (``onnxforge distill``); never the held-out set.
    training_data: Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]] | None = None


_SAMPLES: dict[str, Sample] = {}
# The modules that register the bundled samples when imported.
SAMPLE_MODULES = ("digits", "minilm", "resnet", "seed_cnn", "transformer")
_loaded = False


def _load_sample_modules() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in SAMPLE_MODULES:
            importlib.import_module(f"onnxforge.samples.{module}")


def register_sample(sample: Sample) -> Sample:
    """Add a sample to the catalogue."""
    _SAMPLES[sample.name] = sample
    return sample


def available_samples() -> dict[str, Sample]:
    """All samples by name."""
    _load_sample_modules()
    return dict(sorted(_SAMPLES.items()))


def get_sample(name: str) -> Sample:
    """The sample called ``name``; an unknown name lists the samples."""
    _load_sample_modules()
    try:
        return _SAMPLES[name]
    except KeyError:
        raise InputError(
            f"unknown sample '{name}'", hint=f"bundled samples: {', '.join(available_samples())}"
        ) from None

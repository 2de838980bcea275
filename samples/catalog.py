"""The catalogue of bundled sample models, looked up by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from onnxforge.errors import InputError

__all__ = ["Sample", "register_sample", "get_sample", "available_samples"]


@dataclasses.dataclass(frozen=True)
class Sample:
    """A bundled model: a factory for the module (weights included) and its example inputs."""

    name: str
    summary: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]


_SAMPLES: dict[str, Sample] = {}


def register_sample(sample: Sample) -> Sample:
    """Add a sample to the catalogue."""
    _SAMPLES[sample.name] = sample
    return sample


def available_samples() -> dict[str, Sample]:
    """All samples by name."""
    return dict(sorted(_SAMPLES.items()))


def get_sample(name: str) -> Sample:
    """The sample called ``name``; an unknown name lists the samples."""
    try:
        return _SAMPLES[name]
    except KeyError:
        raise InputError(
            f"unknown sample '{name}'", hint=f"bundled samples: {', '.join(available_samples())}"
        ) from None

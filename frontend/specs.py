"""Model specs: a bundled sample name, or ``package.module:factory``.

A factory returns a module, or a ``(module, example_inputs)`` pair. More spec kinds (``.pt2``
archives, state dicts with ``torch.load(weights_only=True)``) arrive with the frontend issue;
an arbitrary pickle is never loaded.
"""

from __future__ import annotations

import importlib

import torch

from onnxforge.errors import InputError
from onnxforge.samples import available_samples, get_sample

__all__ = ["resolve_spec"]


def resolve_spec(spec: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    """The module a spec names, and its example inputs when the spec provides them."""
    if ":" not in spec:
        if spec not in available_samples():
            raise InputError(
                f"'{spec}' is neither a bundled sample nor a package.module:factory spec",
                hint=f"bundled samples: {', '.join(available_samples())}",
            )
        sample = get_sample(spec)
        return sample.build(), sample.example_inputs(2)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise InputError(
            f"cannot import '{spec}': {error}",
            hint="write package.module:factory, importable from here",
        ) from None
    built = factory()
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        module, inputs = built
        return module, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not isinstance(built, torch.nn.Module):
        raise InputError(f"'{spec}' returned {type(built).__name__}, not a torch.nn.Module")
    return built, None

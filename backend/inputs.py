"""Model inputs: seeded random tensors from a model's input specs, or arrays from ``.npz`` files."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxforge.errors import InputError

__all__ = ["InputSpec", "input_specs", "make_inputs", "load_inputs", "DEFAULT_SEED"]

DEFAULT_SEED = 0
# A symbolic dimension that is neither the batch axis nor bound by name gets this size.
DEFAULT_SYMBOLIC_DIM = 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and shape (ints, or names for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The specs of the graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None or value.shape is None:
            raise InputError(f"graph input '{value.name}' has no tensor type or shape")
        shape = tuple(
            dim if isinstance(dim, int) else (dim.value if dim.value else None)
            for dim in value.shape
        )
        specs.append(InputSpec(str(value.name), value.dtype.numpy(), shape))
    return specs


def make_inputs(
    model: ir.Model,
    *,
    batch: int = 1,
    dims: Mapping[str, int] | None = None,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input that is not an initializer.

    A symbolic first axis is the batch; other symbolic dims come from ``dims`` by name, else 1.
    Floats are standard normal, integers 0 or 1, inputs named like masks all ones.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    inputs = {}
    for spec in input_specs(model):
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and dim in dims:
                shape.append(dims[dim])
            else:
                shape.append(batch if axis == 0 else DEFAULT_SYMBOLIC_DIM)
        if "mask" in spec.name.lower():
            array = np.ones(shape, dtype=spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            array = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            array = rng.random(shape) < 0.5
        elif np.issubdtype(spec.dtype, np.integer):
            array = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            raise InputError(
                f"cannot generate inputs of dtype {spec.dtype} for '{spec.name}'",
                hint="pass the inputs as an .npz file",
            )
        inputs[spec.name] = array
    return inputs


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz`` file, keyed by input name (pickled objects are refused)."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise InputError(f"no such inputs file: {path}") from None
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} is not a readable .npz file: {error}") from None

"""Model specs: what ``onnxforge export SPEC`` accepts.

| spec | meaning |
|---|---|
| ``seed-cnn`` | a bundled sample (``onnxforge samples`` lists them) |
| ``package.module:factory`` | a callable returning a module, or ``(module, example_inputs)`` |
| ``model.pt2`` | a ``torch.export`` archive; its example inputs come with it |
| ``FACTORY@weights.pt`` | a sample or factory, then a state dict loaded into it |

Untrusted pickles are never loaded: a state dict goes through ``torch.load(weights_only=True)``
(or ``numpy.load(allow_pickle=False)`` for ``.npz``), and every pickle inside a ``.pt2``
archive is vetted with the same weights-only unpickler before ``torch.export.load`` (which
would otherwise unpickle without restriction) sees it.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable, Mapping

import numpy as np
import torch

from onnxforge.errors import InputError
from onnxforge.samples import available_samples, get_sample

__all__ = ["ResolvedSpec", "resolve_spec", "load_state_dict", "vet_pt2_archive"]

# Accepted PyTorch-vs-ONNX Runtime relative L2 error where the spec states none.
DEFAULT_EXPORT_TOLERANCE = 1e-4
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".npz")


@dataclasses.dataclass
class ResolvedSpec:
    """What a spec names: a module (or exported program), its inputs and export settings."""

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...] | None = None
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]] | None = None
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
    tolerance: float = DEFAULT_EXPORT_TOLERANCE
    program: torch.export.ExportedProgram | None = None


def _sample(name: str) -> ResolvedSpec:
    sample = get_sample(name)
    return ResolvedSpec(
        name=name,
        module=sample.build(),
        example_inputs=sample.example_inputs(2),
        make_inputs=sample.example_inputs,
        dynamic_axes=sample.dynamic_axes,
        tolerance=sample.export_tolerance,
    )


def _factory(spec: str) -> ResolvedSpec:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise InputError(
            f"cannot import '{spec}': {error}",
            hint="write package.module:factory, importable from here (check PYTHONPATH)",
        ) from None
    if not callable(factory):
        raise InputError(f"'{spec}' names a {type(factory).__name__}, not a factory function")
    built = factory()
    inputs = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        built, raw = built
        inputs = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
    if not isinstance(built, torch.nn.Module):
        raise InputError(f"'{spec}' returned {type(built).__name__}, not a torch.nn.Module")
    return ResolvedSpec(name=spec, module=built, example_inputs=inputs)


def _pickle_members(archive: zipfile.ZipFile) -> list[str]:
    """Members of a .pt2 archive that hold pickles, read from its payload configs."""
    members = [n for n in archive.namelist() if n.endswith((".pt", ".pkl"))]
    for name in archive.namelist():
        if not name.endswith("_config.json"):
            continue
        folder = name.rsplit("/", 1)[0]
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            raise InputError(f"the .pt2 archive has an unreadable payload config {name}") from None
        for entry in config.values():
            if entry.get("use_pickle") or entry.get("path_name", "").startswith(
                ("custom_obj", "tensor_pickle", "pickle")
            ):
                members.append(f"{folder}/{entry['path_name']}")
    return members


def vet_pt2_archive(path: pathlib.Path) -> None:
    """Refuse a .pt2 archive holding any pickle that the weights-only unpickler rejects."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{path} is not a torch.export archive: {error}") from None
    with archive:
        for member in _pickle_members(archive):
            try:
                data = archive.read(member)
            except KeyError:
                raise InputError(
                    f"{path}: the archive lists {member} but does not hold it"
                ) from None
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise InputError(
                    f"refusing {path}: {member} is a pickle that is not plain tensor data "
                    f"({first})",
                    hint="only archives whose pickles load with torch.load(weights_only=True) "
                    "are accepted; re-export the model with torch.export.save",
                ) from None


def _pt2(path: pathlib.Path) -> ResolvedSpec:
    if not path.is_file():
        raise InputError(f"no such torch.export archive: {path}")
    vet_pt2_archive(path)
    try:
        program = torch.export.load(path)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"cannot load the torch.export archive {path}: {first}") from None
    args, kwargs = program.example_inputs or ((), {})
    if kwargs:
        raise InputError(f"{path}: keyword example inputs are not supported")
    return ResolvedSpec(
        name=str(path),
        module=program.module(),
        example_inputs=tuple(args) or None,
        program=program,
    )


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth``/``.bin`` (weights-only unpickling) or ``.npz``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"no such weights file: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: torch.from_numpy(data[name]) for name in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            raise InputError(f"{path} is not a readable .npz of arrays: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"refusing {path}: not a plain state dict ({first})",
            hint="only files that load with torch.load(weights_only=True) are accepted",
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _with_weights(spec: str, weights: str) -> ResolvedSpec:
    if not weights.endswith(STATE_DICT_SUFFIXES):
        raise InputError(
            f"unknown weights file type '{weights}'",
            hint=f"use one of {', '.join(STATE_DICT_SUFFIXES)}",
        )
    resolved = resolve_spec(spec)
    try:
        resolved.module.load_state_dict(load_state_dict(weights))
    except RuntimeError as error:
        first = (str(error).strip().splitlines() or ["mismatch"])[0]
        raise InputError(f"the weights in {weights} do not fit {spec}: {first}") from None
    resolved.name = f"{spec}@{weights}"
    return resolved


def resolve_spec(spec: str | os.PathLike[str]) -> ResolvedSpec:
    """Resolve a spec string (see the module docstring) to a module and its settings."""
    text = os.fspath(spec)
    if "@" in text:
        base, _, weights = text.rpartition("@")
        return _with_weights(base, weights)
    if text.endswith(".pt2"):
        return _pt2(pathlib.Path(text))
    if ":" in text:
        return _factory(text)
    if text in available_samples():
        return _sample(text)
    raise InputError(
        f"'{text}' is not a bundled sample, a package.module:factory, or a .pt2 archive",
        hint=f"bundled samples: {', '.join(available_samples())}",
    )

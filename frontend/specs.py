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

import contextlib
import dataclasses
import importlib
import io
import json
import os
import pathlib
import pickle
import types
import zipfile
from collections.abc import Callable, Mapping

import numpy as np
import torch

from onnxforge.errors import InputError, first_line
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


# Member suffixes and payload names that mean "a pickle is in here" (compared in lower case:
# torch's archive reader finds members whatever their case).
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
_PICKLED_PAYLOAD_PREFIXES = ("custom_obj", "tensor_pickle", "pickle", "opaque_obj")


def _pickle_members(archive: zipfile.ZipFile) -> list[str]:
    """Members of a .pt2 archive that hold pickles: by suffix, and from its payload configs."""
    by_lower = {name.lower(): name for name in archive.namelist()}
    members = [name for lower, name in by_lower.items() if lower.endswith(_PICKLE_SUFFIXES)]
    for lower, name in by_lower.items():
        if not lower.endswith("_config.json"):
            continue
        folder = name.rsplit("/", 1)[0]
        try:
            config = json.loads(archive.read(name)).get("config", {})
            entries = list(config.values())
        except (ValueError, AttributeError):
            raise InputError(f"the .pt2 archive has an unreadable payload config {name}") from None
        for entry in entries:
            path_name = str(entry.get("path_name", ""))
            if entry.get("use_pickle") or path_name.lower().startswith(_PICKLED_PAYLOAD_PREFIXES):
                member = f"{folder}/{path_name}".lower()
                members.append(by_lower.get(member, f"{folder}/{path_name}"))
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
            except Exception as error:  # any failure: not provably plain tensor data
                first = first_line(error)
                raise InputError(
                    f"refusing {path}: {member} is a pickle that is not plain tensor data "
                    f"({first})",
                    hint="only archives whose pickles load with torch.load(weights_only=True) "
                    "are accepted; re-export the model with torch.export.save",
                ) from None


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a .pt2 archive")


def _refuse(*args, **kwargs):
    raise pickle.UnpicklingError("refusing to unpickle a TorchScript object from a .pt2 archive")


@contextlib.contextmanager
def _weights_only_unpickling():
    """Make every unpickling inside ``torch.export.load`` safe while it runs.

    Every ``torch.load`` is weights-only, plain ``pickle.loads`` may build no objects, and
    TorchScript objects are refused: the second line of defence behind
    :func:`vet_pt2_archive`, for pickles the vetting did not find.
    """
    from torch.export.pt2_archive import _package

    original_load = torch.load
    original_package_pickle = _package.pickle
    original_obj_load = getattr(torch._C, "_pickle_load_obj", None)

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    shim = types.SimpleNamespace(
        **{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")}
    )
    shim.loads = lambda data, **kw: _NoGlobalsUnpickler(io.BytesIO(data)).load()
    torch.load = load
    _package.pickle = shim
    if original_obj_load is not None:
        torch._C._pickle_load_obj = _refuse
    try:
        yield
    finally:
        torch.load = original_load
        _package.pickle = original_package_pickle
        if original_obj_load is not None:
            torch._C._pickle_load_obj = original_obj_load


def _pt2(path: pathlib.Path) -> ResolvedSpec:
    if not path.is_file():
        raise InputError(f"no such torch.export archive: {path}")
    vet_pt2_archive(path)
    try:
        with _weights_only_unpickling():
            program = torch.export.load(path)
    except Exception as error:
        first = first_line(error)
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
        first = first_line(error)
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
        lines = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()]
        detail = " ".join(lines[:3]) or str(error).strip()
        raise InputError(f"the weights in {weights} do not fit {spec}: {detail}") from None
    resolved.name = f"{spec}@{weights}"
    return resolved


def resolve_spec(spec: str | os.PathLike[str]) -> ResolvedSpec:
    """Resolve a spec string (see the module docstring) to a module and its settings."""
    text = os.fspath(spec)
    if "@" in text and not os.path.exists(text):
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

"""Model I/O: lazy loading, and atomic, deterministic saving that never overwrites its input.

``load`` gives an ``onnx_ir.Model`` with lazy external data; ``save`` writes with provenance
metadata.

How ``save`` writes: everything goes to a fresh temporary folder beside the target (same file
system), is flushed with fsync, then moved into place with ``os.replace``, external data first
and the model last. A reader therefore sees the old files or the new ones, never half of
either; a stale ``.data`` file is replaced, never appended to; a failure leaves the target as
it was and no temporary files behind.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import shutil
import tempfile

import onnx
import onnx_ir as ir

from onnxforge import __version__
from onnxforge.errors import InputError, first_line
from onnxforge.passes.statistics import iter_graphs, model_stats

__all__ = [
    "load",
    "save",
    "atomic_write_bytes",
    "atomic_write_text",
    "PIPELINE_KEY",
    "VERSION_KEY",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "external_data_name",
]

logger = logging.getLogger(__name__)

PIPELINE_KEY = "onnxforge.pipeline"
VERSION_KEY = "onnxforge.version"
# Where the model was loaded from, kept in the IR's in-memory metadata (never serialised).
SOURCE_META_KEY = "onnxforge.source"
# Past this many parameter bytes a model is saved with external data (protobuf's hard limit is
# 2 GiB for the whole file); a model loaded with external data keeps it whatever its size.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
# Tensors larger than this many bytes go to the external data file when one is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def external_data_name(path: pathlib.Path) -> str:
    """The external data file written beside ``path``: ``model.onnx`` -> ``model.onnx.data``."""
    return f"{path.name}.data"


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [
        value.const_value
        for graph in iter_graphs(model)
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]


def _validate_external_data(model: ir.Model, model_path: pathlib.Path) -> None:
    """Refuse external data that points outside the model's folder or past its file's end."""
    root = model_path.parent.resolve()
    sizes: dict[pathlib.Path, int] = {}
    for tensor in _external_tensors(model):
        location = pathlib.PurePosixPath(tensor.location.replace("\\", "/"))
        where = f"tensor '{tensor.name}' of {model_path}"
        if location.is_absolute() or ".." in location.parts or not location.parts:
            raise InputError(
                f"{where}: external data location {tensor.location!r} is not a plain relative path",
                hint="external data must sit beside the model",
            )
        path = root / location
        if not path.is_file():
            raise InputError(f"{where}: external data file {tensor.location!r} is missing")
        if root not in path.resolve().parents:
            raise InputError(
                f"{where}: external data file {tensor.location!r} resolves "
                "outside the model's folder",
                hint="remove the symbolic link",
            )
        size = sizes.setdefault(path, path.stat().st_size)
        offset, length = tensor.offset or 0, tensor.length
        if length is None:
            length = tensor.nbytes
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(
                f"{where}: external data range {offset}+{length} lies past the "
                f"end of {tensor.location!r} ({size} bytes)"
            )


def load(source: str | os.PathLike[str] | bytes) -> ir.Model:
    """Load an ONNX model from a path (external data stays lazy) or from serialised bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_from_string(bytes(source))
        except Exception as error:
            raise InputError(f"the bytes are not an ONNX model: {error}") from None
        if proto.ir_version < 1:
            raise InputError("the bytes are not an ONNX model (no IR version)")
        return ir.serde.deserialize_model(proto)
    path = pathlib.Path(source).resolve()  # lazy tensors keep this folder: make it absolute
    if not path.exists():
        raise InputError(f"no such model file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}", hint="pass the path of a .onnx file")
    try:
        model = ir.load(path)
    except Exception as error:
        reason = first_line(error)
        raise InputError(f"{path} is not a readable ONNX model: {reason}") from None
    if model.ir_version < 1:
        raise InputError(f"{path} is not an ONNX model (empty, or no IR version)")
    _validate_external_data(model, path)
    model.meta[SOURCE_META_KEY] = str(path)
    return model


def _same_file(a: pathlib.Path, b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_overwriting_inputs(
    model: ir.Model, path: pathlib.Path, data_path: pathlib.Path
) -> None:
    source = model.meta.get(SOURCE_META_KEY)
    if source and _same_file(path, source):
        raise InputError(
            f"refusing to overwrite the input model {path}", hint="write the result to another path"
        )
    for tensor in _external_tensors(model):
        if _same_file(data_path, os.path.join(tensor.base_dir, tensor.location)):
            raise InputError(
                f"refusing to overwrite {data_path}: the model reads its weights from that file",
                hint="write the result to another path",
            )


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync and ``os.replace``."""
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as error:
        raise InputError(f"cannot write in {directory}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or error
        raise InputError(f"cannot write {path}: {reason}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _replace_data_then_model(
    new_data: pathlib.Path,
    data_path: pathlib.Path,
    new_model: pathlib.Path,
    model_path: pathlib.Path,
    *,
    backup: pathlib.Path,
) -> None:
    """Move the data file, then the model, into place.

    If the model cannot be moved, the old data file is put back, so that an old model never
    reads the new model's weights.
    """
    had_data = data_path.exists()
    if had_data:
        try:
            os.link(data_path, backup)  # a second name for the old data, no copy
        except OSError:
            shutil.copy2(data_path, backup)
    os.replace(new_data, data_path)
    try:
        os.replace(new_model, model_path)
    except OSError:
        if had_data:
            os.replace(backup, data_path)
        else:
            data_path.unlink(missing_ok=True)
        raise


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> pathlib.Path:
    """Write ``model`` to ``path`` atomically; returns the path.

    ``external_data=None`` writes ``<path>.data`` when the model was loaded with external data
    or is larger than ``EXTERNAL_DATA_THRESHOLD_BYTES``. Stamps ``onnxforge.version`` in the
    model's metadata; ``onnxforge.pipeline`` is stamped by ``optimize``. The same model saved
    twice gives byte-identical files.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder", hint="give a file name such as out.onnx")
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise InputError(f"the folder {directory} does not exist")
    data_path = path.with_name(external_data_name(path))
    _refuse_overwriting_inputs(model, path, data_path)
    if external_data is None:
        external_data = bool(_external_tensors(model)) or (
            model_stats(model).parameter_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
        )
    model.metadata_props[VERSION_KEY] = __version__
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".onnxforge-", dir=directory))
    except OSError as error:
        raise InputError(f"cannot write in {directory}: {error.strerror}") from None
    try:
        tmp_model = tmp / path.name
        ir.save(
            model,
            tmp_model,
            external_data=external_data_name(path) if external_data else None,
            size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
        )
        tmp_data = tmp / external_data_name(path)
        for file in (tmp_data, tmp_model):
            if file.exists():
                _fsync(file)
        if tmp_data.exists():
            _replace_data_then_model(tmp_data, data_path, tmp_model, path, backup=tmp / "old.data")
        else:
            os.replace(tmp_model, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or error
        raise InputError(f"cannot write {path}: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %s%s", path, f" with {data_path.name}" if external_data else "")
    return path

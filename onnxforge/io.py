"""Model I/O: validated lazy loading; atomic, deterministic saving that never overwrites its input.

``load`` checks a model file with :mod:`onnxforge.validate` before anything in it is
deserialised or any weight is read, then gives an ``onnx_ir.Model`` whose external data stays
lazy (memory-mapped on first use). ``save`` writes with provenance metadata.

How ``save`` writes: everything goes to a fresh temporary folder beside the target (same file
system) and is flushed with fsync. External data is named after a digest of its bytes
(``model.onnx.<16 hex>.data``): it is moved into place first, then the model that refers to it
replaces the old model with ``os.replace``, and only then is the old model's data file removed.
At every instant the target is the old model with its old data or the new model with its new
data, never a mix, even if the process is killed (SIGKILL) mid-save; a data file is never
appended to or rewritten in place. A failure (full disk, read-only folder, missing permission)
leaves the target as it was and no temporary files behind, and is reported as one
:class:`~onnxforge.errors.InputError`. Saves into one folder take turns (a lock on the
folder), so concurrent saves to one target leave one of them whole. A process killed mid-save
leaves its hidden temporary folder, and perhaps a data file no model refers to; the next save
into that folder removes the folder, and the next save to that target the data file. The output
is never one of the files the model was read from (compared by inode, so symbolic and hard
links count), and the same model gives the same bytes in any process.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import pathlib
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from onnxforge import __version__
from onnxforge.errors import InputError, first_line
from onnxforge.passes.statistics import model_stats
from onnxforge.validate import (
    MAX_PROTOBUF_BYTES,
    iter_tensor_protos,
    validate_bytes,
    validate_file,
    validate_model_proto,
)

__all__ = [
    "load",
    "save",
    "atomic_write_bytes",
    "atomic_write_text",
    "external_data_files",
    "PIPELINE_KEY",
    "VERSION_KEY",
    "TEMP_PREFIX",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
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
# Hidden temporary folders of save and atomic_write_bytes start with this.
TEMP_PREFIX = ".onnxforge-"
# Hex digits of the data digest in an external data file's name: 64 bits tell saves apart.
_DIGEST_CHARS = 16
_HASH_CHUNK = 8 << 20
# What a failed write's errno means to a user, and what to do about it.
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free some space, or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space, or write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EACCES: ("permission denied", "check the folder's permissions, or write elsewhere"),
    errno.EPERM: ("operation not permitted", "check the folder's permissions, or write elsewhere"),
    errno.EFBIG: (
        "the file is larger than this system allows",
        "a file size limit (ulimit -f) or the file system's; write elsewhere",
    ),
}


# ---------------------------------------------------------------------------------------------
# load


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, functions included."""
    graphs: list[ir.Graph] = [model.graph, *(f.graph for f in model.functions.values())]
    while graphs:
        graph = graphs.pop()
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attribute in node.attributes.values():
                if attribute.is_ref():
                    continue
                if attribute.type == ir.AttributeType.TENSOR:
                    yield attribute.as_tensor()
                elif attribute.type == ir.AttributeType.TENSORS:
                    yield from attribute.as_tensors()
                elif attribute.type == ir.AttributeType.GRAPH:
                    graphs.append(attribute.as_graph())
                elif attribute.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attribute.as_graphs())


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [t for t in _tensors(model) if isinstance(t, ir.ExternalTensor)]


def _parse_error(source: str, error: Exception) -> InputError:
    reason = first_line(error)
    if "MaxDepth" in reason or "recursion" in reason.lower():
        return InputError(
            f"{source}: subgraphs are nested too deeply for protobuf to parse ({reason})",
            hint="a model this deep is broken or hostile; real models nest a few levels",
        )
    if source == "the bytes":
        return InputError(f"the bytes are not an ONNX model: {reason}")
    return InputError(f"{source} is not a readable ONNX model: {reason}")


def _deserialize(proto: onnx.ModelProto, base_dir: pathlib.Path | None, source: str) -> ir.Model:
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # the proto passed validation but onnx_ir cannot build it
        raise InputError(f"{source} is not a valid ONNX model: {first_line(error)}") from None
    for tensor in _external_tensors(model):
        # Relative to the model's folder (validated), never to the working directory.
        tensor.base_dir = str(base_dir) if base_dir is not None else ""
    return model


def load(source: str | os.PathLike[str] | bytes) -> ir.Model:
    """Load an ONNX model from a path (external data stays lazy) or from serialised bytes.

    The model is validated first (see :mod:`onnxforge.validate`); a model given as bytes may
    not refer to external data. Every refusal is an :class:`InputError` naming what is wrong.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        validate_bytes(data)
        try:
            proto = onnx.load_from_string(data)
        except Exception as error:
            raise _parse_error("the bytes", error) from None
        if proto.ir_version < 1:
            raise InputError("the bytes are not an ONNX model (no IR version)")
        validate_model_proto(proto, base_dir=None, source="the model bytes")
        return _deserialize(proto, None, "the model bytes")
    path = pathlib.Path(source)
    try:
        path = path.resolve()  # lazy tensors keep this folder: make it absolute
        if not path.exists():
            raise InputError(f"no such model file: {path}")
        if not path.is_file():
            raise InputError(f"not a file: {path}", hint="pass the path of a .onnx file")
        validate_file(path)
        proto = onnx.load(path, load_external_data=False)
    except InputError:
        raise
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop (3.10-3.12)
        reason = getattr(error, "strerror", None) or first_line(error)
        raise InputError(f"cannot read {path}: {reason}") from None
    except Exception as error:
        raise _parse_error(str(path), error) from None
    validate_model_proto(proto, base_dir=path.parent, source=str(path))
    model = _deserialize(proto, path.parent, str(path))
    model.meta[SOURCE_META_KEY] = str(path)
    return model


def external_data_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The external data files a saved model refers to, in order of first use (none: ``[]``)."""
    path = pathlib.Path(path)
    proto = onnx.load(path, load_external_data=False)
    files: dict[pathlib.Path, None] = {}
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files[path.parent / entry.value] = None
    return list(files)


# ---------------------------------------------------------------------------------------------
# writing: errors, fsync, temporary folders


def _write_error(path: pathlib.Path, error: OSError) -> InputError:
    reason, hint = _WRITE_ERRORS.get(error.errno or 0, (error.strerror or str(error), None))
    return InputError(f"cannot write {path}: {reason}; nothing was written", hint=hint)


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make renames in ``directory`` durable (a no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _host_token() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_prefix() -> str:
    """``.onnxforge-<pid>.<host>.``: whose temporary folder it is, so leftovers can be found."""
    return f"{TEMP_PREFIX}{os.getpid()}.{_host_token()}."


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, and belongs to someone else
    return True


def _remove_abandoned_temporaries(directory: pathlib.Path) -> None:
    """Remove temporary folders left in ``directory`` by killed saves on this host."""
    host = _host_token()
    try:
        leftovers = list(directory.glob(f"{TEMP_PREFIX}*"))
    except OSError:
        return
    for leftover in leftovers:
        pid, _, rest = leftover.name[len(TEMP_PREFIX) :].partition(".")
        if not pid.isdigit() or not rest.startswith(f"{host}.") or not leftover.is_dir():
            continue
        if not _process_is_alive(int(pid)):
            logger.info("removing %s, left by an interrupted save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _make_temporary_folder(directory: pathlib.Path) -> pathlib.Path:
    _remove_abandoned_temporaries(directory)
    try:
        return pathlib.Path(tempfile.mkdtemp(prefix=_temporary_prefix(), dir=directory))
    except OSError as error:
        reason, hint = _WRITE_ERRORS.get(error.errno or 0, (error.strerror or str(error), None))
        raise InputError(f"cannot write in {directory}: {reason}", hint=hint) from None


def _folder_of(path: pathlib.Path) -> pathlib.Path:
    """The folder ``path`` will be written in, which must exist; ``path`` is no folder."""
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    try:
        if path.is_dir():
            raise InputError(f"{path} is a folder", hint="give a file name such as out.onnx")
        if not directory.is_dir():
            raise InputError(f"cannot write {path}: the folder {directory} does not exist")
    except OSError as error:  # a folder on the way that cannot be entered
        raise _write_error(path, error) from None
    return directory


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync and ``os.replace``."""
    path = pathlib.Path(path)
    directory = _folder_of(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(), dir=directory)
    except OSError as error:
        reason, hint = _WRITE_ERRORS.get(error.errno or 0, (error.strerror or str(error), None))
        raise InputError(f"cannot write in {directory}: {reason}", hint=hint) from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# save


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _files_read_by(model: ir.Model) -> dict[pathlib.Path, str]:
    """The files the model was read from (and may still read lazily), each with its role."""
    files: dict[pathlib.Path, str] = {}
    source = model.meta.get(SOURCE_META_KEY)
    if source:
        files[pathlib.Path(source)] = "it is the input model"
    for tensor in _external_tensors(model):
        location = pathlib.Path(tensor.base_dir or ".") / str(tensor.location)
        files.setdefault(location, "the model reads its weights from that file")
    return files


def _refuse_overwriting_inputs(path: pathlib.Path, reads: dict[pathlib.Path, str]) -> None:
    """Refuse a target that is one of the files read (by path, symbolic or hard link)."""
    for file, role in reads.items():
        if _same_file(path, file):
            raise InputError(
                f"refusing to overwrite {path}: {role} ({file})",
                hint="write the result to another path",
            )


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _data_file_pattern(path: pathlib.Path) -> re.Pattern[str]:
    """Names of data files that belong to the model at ``path``: ours and ``<name>.data``."""
    return re.compile(re.escape(path.name) + rf"(\.[0-9a-f]{{{_DIGEST_CHARS}}})?\.data")


def _data_files_of_target(path: pathlib.Path) -> list[pathlib.Path]:
    """The data files the model now at ``path`` refers to and owns (by name), if any."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_PROTOBUF_BYTES:
            return []
        files = external_data_files(path)
    except Exception:  # not a model, or unreadable: nothing of ours to clean up
        return []
    pattern = _data_file_pattern(path)
    return [f for f in files if f.parent == path.parent and pattern.fullmatch(f.name)]


class _InMemoryWeights:
    """While active, external tensors are replaced by in-memory copies (to save inline)."""

    def __init__(self, model: ir.Model) -> None:
        self.swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
        for graph in model.graphs():
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    self.swapped.append((value, value.const_value))

    def __enter__(self) -> None:
        for value, tensor in self.swapped:
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)

    def __exit__(self, *exc) -> None:
        for value, tensor in self.swapped:
            value.const_value = tensor


def _write_files(
    model: ir.Model, folder: pathlib.Path, path: pathlib.Path, external_data: bool
) -> str | None:
    """Write the model (and its data) into ``folder``; the data file's final name, or None."""
    tmp_model = folder / path.name
    provisional = f"{path.name}.data"
    try:
        if external_data:
            ir.save(
                model,
                tmp_model,
                external_data=provisional,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            with _InMemoryWeights(model):
                ir.save(model, tmp_model)
    except ValueError as error:  # protobuf's 2 GiB limit, an absolute path, ...
        raise InputError(
            f"cannot write {path}: {first_line(error)}",
            hint="models past 2 GiB need external data (the default for models loaded with it)",
        ) from None
    tmp_data = folder / provisional
    name = None
    if tmp_data.exists():
        name = f"{path.name}.{_sha256(tmp_data)[:_DIGEST_CHARS]}.data"
        proto = onnx.load(tmp_model, load_external_data=False)
        for tensor in iter_tensor_protos(proto):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == provisional:
                    entry.value = name
        tmp_model.write_bytes(proto.SerializeToString())
        os.replace(tmp_data, folder / name)
        _fsync_file(folder / name)
    _fsync_file(tmp_model)
    return name


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> pathlib.Path:
    """Write ``model`` to ``path`` atomically; returns the path.

    ``external_data=None`` writes the weights to ``<path>.<digest>.data`` when the model was
    loaded with external data or is larger than ``EXTERNAL_DATA_THRESHOLD_BYTES``. Stamps
    ``onnxforge.version`` in the model's metadata; ``onnxforge.pipeline`` is stamped by
    ``optimize``. The same model saved twice, in any process, gives byte-identical files.
    Refuses to write over any file the model was read from; see the module docstring for how
    the write stays atomic.
    """
    path = pathlib.Path(path)
    directory = _folder_of(path)
    reads = _files_read_by(model)
    _refuse_overwriting_inputs(path, reads)
    if external_data is None:
        external_data = bool(_external_tensors(model)) or (
            model_stats(model).parameter_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
        )
    model.metadata_props[VERSION_KEY] = __version__
    with _folder_lock(directory):
        previous = _data_files_of_target(path)
        tmp = _make_temporary_folder(directory)
        placed: pathlib.Path | None = None  # a data file put in place, until the model is
        data_path = None
        try:
            data_name = _write_files(model, tmp, path, external_data)
            if data_name is not None:
                data_path = directory / data_name
                if not data_path.exists():
                    placed = data_path
                os.replace(tmp / data_name, data_path)
                _fsync_directory(directory)
            os.replace(tmp / path.name, path)
            placed = None
            _fsync_directory(directory)
        except OSError as error:
            if placed is not None:
                placed.unlink(missing_ok=True)
            raise _write_error(path, error) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_replaced_data(path, previous, keep=data_path, reads=reads)
    logger.info("saved %s%s", path, f" with {data_path.name}" if data_path else "")
    return path


@contextlib.contextmanager
def _folder_lock(directory: pathlib.Path) -> Iterator[None]:
    """One save at a time in ``directory``, across processes (``flock`` on the folder itself).

    Saves to one target from two processes would otherwise interleave their renames and
    removals; under the lock the last one wins whole, and the data files that no model can
    refer to (left by a killed save) can be told apart and removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # the write itself will report why the folder cannot be used
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_replaced_data(
    path: pathlib.Path,
    previous: list[pathlib.Path],
    *,
    keep: pathlib.Path | None,
    reads: dict[pathlib.Path, str],
) -> None:
    """Remove the data files of ``path`` that no model refers to any more.

    Those are the replaced model's (``previous``) and, under the folder lock, any other file
    named as this target's data (``<name>.<digest>.data``), which a killed save left behind.
    Files the saved model itself was read from are kept.
    """
    pattern = _data_file_pattern(path)
    try:
        found = path.parent.glob(f"{glob.escape(path.name)}.*.data")
        ours = [f for f in found if pattern.fullmatch(f.name)]
    except OSError:
        ours = []
    removed = False
    for file in dict.fromkeys([*previous, *ours]):
        if keep is not None and _same_file(file, keep):
            continue
        if any(_same_file(file, read) for read in reads):
            continue
        try:
            file.unlink()
            removed = True
        except FileNotFoundError:
            continue
        except OSError as error:  # the new model is in place; an orphan file is harmless
            logger.warning("could not remove %s: %s", file, error.strerror)
    if removed:
        _fsync_directory(path.parent)

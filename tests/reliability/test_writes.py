"""Writes: atomic and deterministic, never over an input, clean errors when the disk says no.

Full disks and read-only folders are real where this runs as root (a small tmpfs is mounted);
a write that fails midway is real everywhere (a file size limit, RLIMIT_FSIZE, in a child
process); a missing permission is real everywhere (a child process without root's override, or
chmod for an ordinary user).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.errors import EXIT_BAD_INPUT, InputError
from onnxforge.io import TEMP_PREFIX, external_data_files

from . import hostile
from .conftest import COMMAND, CliResult, run_cli_process

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _weights_model(seed: int, size: int = 4096) -> ir.Model:
    """y = x @ w with a float32[size//64, 64] weight drawn from ``seed`` (external when saved)."""
    w = np.random.default_rng(seed).standard_normal((size // 64, 64)).astype(np.float32)
    proto = hostile.model_proto(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size // 64])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        initializers=[numpy_helper.from_array(w, "w")],
    )
    return ir.serde.deserialize_model(proto)


def _weight(path: pathlib.Path) -> np.ndarray:
    return onnxforge.load(path).graph.initializers["w"].const_value.numpy()


# --- layout and replacement ------------------------------------------------------------------


def test_the_data_file_is_named_by_its_digest_and_the_old_one_goes(tmp_path):
    target = tmp_path / "model.onnx"
    onnxforge.save(_weights_model(1), target, external_data=True)
    (first,) = external_data_files(target)
    assert re.fullmatch(r"model\.onnx\.[0-9a-f]{16}\.data", first.name)
    onnxforge.save(_weights_model(2), target, external_data=True)
    (second,) = external_data_files(target)
    assert second != first
    assert not first.exists()  # the replaced model's data file is removed after the switch
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, second.name])
    np.testing.assert_array_equal(
        _weight(target), _weights_model(2).graph.initializers["w"].const_value.numpy()
    )


def test_saving_the_same_weights_again_keeps_one_data_file(tmp_path):
    target = tmp_path / "model.onnx"
    onnxforge.save(_weights_model(1), target, external_data=True)
    before = _files(tmp_path)
    onnxforge.save(_weights_model(1), target, external_data=True)
    assert _files(tmp_path) == before


def test_a_data_file_of_another_model_is_never_removed(tmp_path):
    # A model another tool wrote refers to shared.data; overwriting it leaves shared.data alone,
    # since its name does not say it belongs to the model.
    shared = tmp_path / "shared.data"
    shared.write_bytes(hostile.bias().tobytes())
    target = tmp_path / "model.onnx"
    target.write_bytes(hostile.tiny_proto(hostile.external_bias("shared.data")).SerializeToString())
    onnxforge.save(_weights_model(1), target, external_data=True)
    assert shared.read_bytes() == hostile.bias().tobytes()


def test_an_inline_save_of_a_model_read_with_external_data_holds_the_weights(tmp_path):
    source = onnxforge.save(_weights_model(3), tmp_path / "a.onnx", external_data=True)
    model = onnxforge.load(source)
    inline = onnxforge.save(model, tmp_path / "b.onnx", external_data=False)
    assert external_data_files(inline) == []
    np.testing.assert_array_equal(_weight(inline), _weight(source))


def test_save_flushes_everything_before_it_renames_and_moves_the_data_first(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    if not pathlib.Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file descriptors that are flushed")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = onnxforge.save(_weights_model(1), tmp_path / "model.onnx", external_data=True)
    monkeypatch.undo()
    (data_file,) = external_data_files(target)
    placed = [path for kind, path in events if kind == "replace"]
    assert placed[-2:] == [str(data_file), str(target)]  # the data first, then the model
    flushed = [path for kind, path in events[: events.index(("replace", str(data_file)))]]
    assert any(path.endswith(data_file.name) for path in flushed)  # data flushed before
    assert any(path.endswith(target.name) for path in flushed)  # so was the model
    after_model = events[events.index(("replace", str(target))) :]
    assert ("fsync", str(tmp_path)) in after_model  # and the folder, after the renames
    # every file was written in the target's folder (one file system: renames are atomic)
    assert all(pathlib.Path(path).is_relative_to(tmp_path) for _, path in events)


# --- never over an input ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link", "relative-path"])
def test_output_equal_to_the_input_is_refused(tmp_path, how, run_cli):
    source = onnxforge.save(_weights_model(1), tmp_path / "in.onnx")
    before = _files(tmp_path)
    target = {"same-path": source, "relative-path": pathlib.Path("./sub/../in.onnx")}.get(how)
    if how == "relative-path":
        (tmp_path / "sub").mkdir()
    if how == "symlink":
        target = tmp_path / "link.onnx"
        target.symlink_to(source.name)
    elif how == "hard-link":
        target = tmp_path / "link.onnx"
        os.link(source, target)
    result = run_cli("optimize", source, "-o", target, "-p", "cleanup", cwd=tmp_path)
    assert result.code == EXIT_BAD_INPUT
    (line,) = result.lines
    assert line.startswith("error: refusing to overwrite") and "the input model" in line
    after = _files(tmp_path)
    after.pop("link.onnx", None)
    assert after == before
    with pytest.raises(InputError, match="refusing to overwrite"):
        onnxforge.save(onnxforge.load(source), tmp_path / target)


# --- determinism across processes ------------------------------------------------------------


def _pipeline_model() -> onnx.ModelProto:
    """Something for every default pass: a shape chain to fold, duplicates, Conv+BN+Relu."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    scale, bias_, mean = (rng.random(8).astype(np.float32) + 0.5 for _ in range(3))
    var = rng.random(8).astype(np.float32) + 0.5
    dense = rng.standard_normal((8 * 6 * 6, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Identity", ["r"], ["ri"]),
        helper.make_node("Shape", ["ri"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["ri", "flat_shape"], ["f"]),
        helper.make_node("MatMul", ["f", "dense"], ["m"]),
        helper.make_node("MatMul", ["f", "dense_copy"], ["m2"]),
        helper.make_node("Concat", ["m", "m2"], ["y"], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(w, "w"),
        *(
            numpy_helper.from_array(a, n)
            for a, n in ((scale, "scale"), (bias_, "bias"), (mean, "mean"), (var, "var"))
        ),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(dense, "dense"),
        numpy_helper.from_array(dense.copy(), "dense_copy"),
    ]
    return hostile.model_proto(
        nodes,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 20])],
        initializers=initializers,
    )


def test_optimize_gives_the_same_bytes_in_every_process(tmp_path):
    source = onnxforge.save(
        ir.serde.deserialize_model(_pipeline_model()), tmp_path / "in.onnx", external_data=True
    )
    outputs = []
    for seed in ("0", "1"):  # different str hashes: no set or dict order may leak out
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        result = run_cli_process(
            "optimize", source, "-o", folder / "out.onnx", "-p", "default",
            cwd=folder, env={"PYTHONHASHSEED": seed},
        )  # fmt: skip
        assert result.code == 0, result.stderr
        outputs.append(_files(folder))
    assert outputs[0] == outputs[1]
    names = sorted(outputs[0])
    assert names[0] == "out.onnx" and re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", names[1])
    optimized = onnx.load(tmp_path / "run0" / "out.onnx", load_external_data=False)
    assert "BatchNormalization" not in {n.op_type for n in optimized.graph.node}  # passes ran


# --- failures: full disk, size limit, read-only folder, missing permission ------------------


@contextlib.contextmanager
def _tmpfs(folder: pathlib.Path, options: str):
    """A tmpfs mounted on ``folder``, unmounted afterwards; skips where none can be mounted."""
    folder.mkdir()
    if not _mount_tmpfs(folder, options):
        pytest.skip("cannot mount a tmpfs here (root with mount privileges needed)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.skipif(
    not IS_ROOT, reason="mounting a small tmpfs needs root (see the size-limit test)"
)
def test_a_full_disk_is_a_clean_error_and_leaves_the_old_model(tmp_path, run_cli):
    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        target = onnxforge.save(_weights_model(1), disk / "model.onnx", external_data=True)
        before = _files(disk)
        source = onnxforge.save(_weights_model(2, size=256 * 1024), tmp_path / "big.onnx")
        result = run_cli("optimize", source, "-o", target, "-p", "cleanup", cwd=tmp_path)
        assert result.code == EXIT_BAD_INPUT, result.stderr
        (line,) = result.lines
        assert "the disk is full; nothing was written" in line and str(target) in line
        assert "Traceback" not in result.stderr
        assert _files(disk) == before  # the old model and its data, nothing else
        assert not [p for p in disk.iterdir() if p.name.startswith(TEMP_PREFIX)]
        np.testing.assert_array_equal(
            _weight(target), _weights_model(1).graph.initializers["w"].const_value.numpy()
        )


SIZE_LIMITED_CLI = textwrap.dedent(
    """
    import resource, signal, sys
    from onnxforge import cli

    limit = int(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["onnxforge", *sys.argv[2:]]
    cli.main()
    """
)


def test_a_write_failing_midway_leaves_the_old_model_and_no_partial_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = onnxforge.save(_weights_model(1), out / "model.onnx", external_data=True)
    before = _files(out)
    source = onnxforge.save(_weights_model(2, size=1 << 20), tmp_path / "big.onnx")
    result = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED_CLI, str(256 * 1024),
         "optimize", str(source), "-o", str(target), "-p", "cleanup"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert len(lines) == 1 and "larger than this system allows; nothing was written" in lines[0]
    assert _files(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]


def _mount_tmpfs(folder: pathlib.Path, options: str) -> bool:
    """Mount a tmpfs on ``folder`` (which must exist); whether that worked (root, privileges)."""
    if not IS_ROOT:
        return False
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return mounted.returncode == 0


def test_a_read_only_folder_is_a_clean_error(tmp_path, request):
    source = onnxforge.save(_weights_model(1), tmp_path / "in.onnx")
    folder = tmp_path / "ro"
    folder.mkdir()
    if _mount_tmpfs(folder, "ro,size=64k"):  # a read-only file system
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
        expected = "the file system is read-only"
    else:  # a folder without write permission, for a process that permissions apply to
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        expected = "permission denied"
    result = _without_permission_override(
        tmp_path, "optimize", source, "-o", folder / "out.onnx", "-p", "cleanup"
    )
    assert result.code == EXIT_BAD_INPUT, result.stderr
    (line,) = result.lines
    assert expected in line and "hint:" in line
    assert list(folder.iterdir()) == []


def _without_permission_override(
    cwd: pathlib.Path, *args: object, python: bool = False
) -> CliResult:
    """The command line in a process that file permissions apply to, even when run as root.

    Root keeps its uid but loses the capabilities that override permissions (setpriv), so the
    files' owner bits decide, as they do for an ordinary user.
    """
    prefix: list[str] = []
    if IS_ROOT:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv cannot drop its permission override")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    command = [sys.executable] if python else COMMAND
    result = subprocess.run(
        [*prefix, *command, *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return CliResult(result.returncode, result.stdout, result.stderr)


def test_a_folder_without_write_permission_is_a_clean_error(tmp_path, request):
    source = onnxforge.save(_weights_model(1), tmp_path / "in.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    request.addfinalizer(lambda: locked.chmod(0o755))
    result = _without_permission_override(
        tmp_path, "optimize", source, "-o", locked / "out.onnx", "-p", "cleanup"
    )
    assert result.code == EXIT_BAD_INPUT, result.stderr
    (line,) = result.lines
    assert "permission denied" in line and str(locked) in line
    assert "Traceback" not in result.stderr
    assert list(locked.iterdir()) == []


LOAD_AND_REPORT = (
    "import sys, onnxforge\n"
    "try:\n"
    "    onnxforge.load(sys.argv[1])\n"
    "except onnxforge.InputError as error:\n"
    "    print(error)\n"
)


def test_a_model_without_read_permission_is_a_clean_error(tmp_path, request):
    source = onnxforge.save(_weights_model(1), tmp_path / "in.onnx")
    source.chmod(0o000)
    request.addfinalizer(lambda: source.chmod(0o644))
    # The command line: click checks readability first, a usage error (exit 2) without traceback.
    result = _without_permission_override(tmp_path, "inspect", source)
    assert result.code == EXIT_BAD_INPUT, result.stderr
    assert "is not readable" in result.stderr and "Traceback" not in result.stderr
    # The API: one InputError line.
    loaded = _without_permission_override(tmp_path, "-c", LOAD_AND_REPORT, source, python=True)
    assert loaded.stdout.strip() == f"cannot read {source}: Permission denied", loaded.stderr


# --- leftovers of killed saves ---------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_save_removes_the_leftovers_of_killed_saves_and_only_those(tmp_path):
    from onnxforge.io import _host_token

    dead = tmp_path / f"{TEMP_PREFIX}{_dead_pid()}.{_host_token()}.abc"
    alive = tmp_path / f"{TEMP_PREFIX}{os.getpid()}.{_host_token()}.def"
    elsewhere = tmp_path / f"{TEMP_PREFIX}{_dead_pid()}.0000ffff.ghi"  # another host's
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"\0" * 64)
    onnxforge.save(_weights_model(1), tmp_path / "model.onnx")
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists()

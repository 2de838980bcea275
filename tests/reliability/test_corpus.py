"""The corpus of bad and hostile models, each generated here and fed to the command line.

For every case: exit code 2, exactly one line on stderr (``error: ...`` naming the problem), no
traceback, no output written, and every file under the test's folder (the model, its data, the
"secret" file beside the folder that an attack tries to reach) byte-for-byte as it was.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import pytest

import onnxforge
from onnxforge.errors import EXIT_BAD_INPUT, InputError
from onnxforge.validate import MAX_SUBGRAPH_DEPTH, runtime_support

from . import hostile
from .conftest import COMMAND, run_cli_process

SECRET = "secret.bin"
NBYTES = hostile.WIDTH * 4

# A case writes its model (and files) into `folder`, beside which `outside` holds the secret;
# it returns the model's path.
Builder = Callable[[pathlib.Path, pathlib.Path], pathlib.Path]


def _model_bytes(make: Callable[[], bytes]) -> Builder:
    def build(folder: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
        path = folder / "model.onnx"
        path.write_bytes(make())
        return path

    return build


def _external(location: str | Callable[[pathlib.Path], str], **entries) -> Builder:
    def build(folder: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
        text = location(outside) if callable(location) else location
        return hostile.write_external_model(folder, text, **entries)

    return build


def _prepared(prepare: Callable[[pathlib.Path, pathlib.Path], None], location: str) -> Builder:
    """An external-data model whose data file is set up by ``prepare(folder, outside)``."""

    def build(folder: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
        folder.mkdir(parents=True, exist_ok=True)
        prepare(folder, outside)
        return hostile.write_external_model(folder, location, data=False)

    return build


def _symlink_out(folder: pathlib.Path, outside: pathlib.Path) -> None:
    (folder / "weights.data").symlink_to(outside / SECRET)


def _symlinked_folder_out(folder: pathlib.Path, outside: pathlib.Path) -> None:
    (folder / "sub").symlink_to(outside)


def _hard_link(folder: pathlib.Path, outside: pathlib.Path) -> None:
    os.link(outside / SECRET, folder / "weights.data")


def _symlink_loop(folder: pathlib.Path, outside: pathlib.Path) -> None:
    (folder / "weights.data").symlink_to("loop.data")
    (folder / "loop.data").symlink_to("weights.data")


def _fifo(folder: pathlib.Path, outside: pathlib.Path) -> None:
    os.mkfifo(folder / "weights.data")  # reading it would block forever


def _directory(folder: pathlib.Path, outside: pathlib.Path) -> None:
    (folder / "weights.data").mkdir()


def _short_file(folder: pathlib.Path, outside: pathlib.Path) -> None:
    (folder / "weights.data").write_bytes(hostile.bias().tobytes()[: NBYTES // 2])


def _pickle(folder: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
    path = folder / "model.onnx"
    path.write_bytes(hostile.pickled(outside / "pwned"))
    return path


def _torch_save(folder: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
    path = folder / "model.onnx"
    path.write_bytes(hostile.torch_saved(outside / "pwned"))
    return path


def _too_new_ir() -> bytes:
    return hostile.with_versions(ir_version=runtime_support().ir_version + 1)


def _too_new_opset() -> bytes:
    return hostile.with_versions(opsets={"": runtime_support().opsets[""] + 1})


def _too_new_ml_opset() -> bytes:
    newest = runtime_support().opsets["ai.onnx.ml"]
    return hostile.with_versions(opsets={"": hostile.OPSET, "ai.onnx.ml": newest + 1})


def _no_graph() -> bytes:
    import onnx

    return onnx.ModelProto(ir_version=hostile.IR_VERSION).SerializeToString()


CASES: dict[str, tuple[Builder, str]] = {
    # files that are not ONNX models
    "zero-bytes": (_model_bytes(lambda: b""), "is empty"),
    "truncated": (_model_bytes(hostile.truncated), "not a readable ONNX model"),
    "random-bytes": (_model_bytes(hostile.random_bytes), "not a readable ONNX model"),
    "pickle-renamed-onnx": (_pickle, "is a Python pickle"),
    "torch-save-renamed-onnx": (_torch_save, "is a zip archive"),
    "no-graph": (_model_bytes(_no_graph), "its graph has no outputs"),
    # external data attacks
    "ext-absolute-path": (_external(lambda out: str(out / SECRET)), "not a plain relative path"),
    "ext-dot-dot": (_external(f"../{SECRET}"), "not a plain relative path"),
    "ext-nested-dot-dot": (_external(f"sub/../../{SECRET}"), "not a plain relative path"),
    "ext-inner-dot-dot": (_external("sub/../weights.data"), "not a plain relative path"),
    "ext-windows-drive": (_external(f"C:\\{SECRET}"), "not a plain relative path"),
    "ext-windows-drive-slash": (_external(f"C:/{SECRET}"), "not a plain relative path"),
    "ext-windows-drive-relative": (_external(f"C:{SECRET}"), "not a plain relative path"),
    "ext-windows-unc": (_external(f"\\\\server\\share\\{SECRET}"), "not a plain relative path"),
    "ext-backslash-root": (_external(f"\\{SECRET}"), "not a plain relative path"),
    "ext-backslash-dot-dot": (_external(f"..\\{SECRET}"), "not a plain relative path"),
    "ext-nul-in-location": (_external("weights.data\x00.png"), "not a plain relative path"),
    "ext-empty-location": (_external(""), "not a plain relative path"),
    "ext-symlink-leaving": (_prepared(_symlink_out, "weights.data"), "outside the model's folder"),
    "ext-symlinked-folder-leaving": (
        _prepared(_symlinked_folder_out, f"sub/{SECRET}"),
        "outside the model's folder",
    ),
    "ext-symlink-loop": (_prepared(_symlink_loop, "weights.data"), "cannot be resolved"),
    "ext-hard-link": (_prepared(_hard_link, "weights.data"), "2 hard links"),
    "ext-unknown-key": (_external("weights.data", extra=[("basepath", "/")]), "unknown external"),
    "ext-duplicate-key": (
        _external("weights.data", extra=[("location", f"../{SECRET}")]),
        "'location' twice",
    ),
    "ext-negative-offset": (_external("weights.data", offset="-4"), "not a non-negative integer"),
    "ext-hex-offset": (_external("weights.data", offset="0x10"), "not a non-negative integer"),
    "ext-negative-length": (_external("weights.data", length="-1"), "not a non-negative integer"),
    "ext-offset-past-end": (_external("weights.data", offset=str(NBYTES)), "past the end"),
    "ext-length-mismatch": (
        _external("weights.data", length=str(NBYTES - 4)),
        f"which takes {NBYTES} bytes",
    ),
    "ext-data-shorter-than-tensor": (
        _prepared(_short_file, "weights.data"),
        "the file is shorter than the tensor",
    ),
    "ext-missing-file": (_external("weights.data", data=False), "is missing"),
    "ext-fifo": (_prepared(_fifo, "weights.data"), "not a regular file"),
    "ext-directory": (_prepared(_directory, "weights.data"), "not a regular file"),
    # tensors
    "raw-data-mismatch": (_model_bytes(hostile.raw_data_mismatch), "bytes of raw_data"),
    "typed-data-mismatch": (_model_bytes(hostile.typed_data_mismatch), "values in float_data"),
    "dims-overflow": (_model_bytes(hostile.dims_overflow), "overflows int64"),
    "negative-dim": (_model_bytes(hostile.negative_dim), "negative dimension"),
    "unknown-data-type": (_model_bytes(hostile.unknown_data_type), "unknown data type"),
    # resources
    "huge-constant-of-shape": (
        _model_bytes(lambda: hostile.constant_of_shape([1 << 20, 1 << 20, 16])),
        "budget for one tensor",
    ),
    "huge-constant-of-shape-from-a-constant-node": (
        _model_bytes(
            lambda: hostile.constant_of_shape_from_a_constant_node([1 << 20, 1 << 20, 16])
        ),
        "budget for one tensor",
    ),
    "constant-of-shape-overflow": (
        _model_bytes(lambda: hostile.constant_of_shape([1 << 31] * 3)),
        "overflows int64",
    ),
    "huge-declared-output": (_model_bytes(hostile.huge_declared_output), "budget for one tensor"),
    "deep-if": (_model_bytes(lambda: hostile.deep_if(MAX_SUBGRAPH_DEPTH + 4)), "nested 17 deep"),
    "deep-if-past-protobuf": (
        _model_bytes(lambda: hostile.deep_if_bytes(60)),
        "nested too deeply for protobuf",
    ),
    "recursive-function": (
        _model_bytes(hostile.recursive_function),
        "calls itself (local:f -> local:f)",
    ),
    "mutually-recursive-functions": (
        _model_bytes(hostile.mutually_recursive_functions),
        "calls itself",
    ),
    "exponential-functions": (
        _model_bytes(lambda: hostile.exponential_functions(40)),
        "once its function calls are inlined",
    ),
    # versions
    "ir-version-too-new": (_model_bytes(_too_new_ir), "is newer than ONNX Runtime"),
    "opset-too-new": (_model_bytes(_too_new_opset), "opset ai.onnx"),
    "ml-opset-too-new": (_model_bytes(_too_new_ml_opset), "opset ai.onnx.ml"),
}


@pytest.fixture
def case_folder(tmp_path):
    """``(folder, outside)``: the model's folder, inside ``outside``, which holds the secret."""
    outside = tmp_path
    (outside / SECRET).write_bytes(hostile.bias().tobytes())
    folder = outside / "m"
    folder.mkdir()
    return folder, outside


def _build(name: str, case_folder) -> tuple[pathlib.Path, pathlib.Path, dict]:
    folder, outside = case_folder
    build, _ = CASES[name]
    path = build(folder, outside)
    return path, outside, hostile.snapshot(outside)


def _assert_refused(result, fragment: str, outside: pathlib.Path, before: dict) -> None:
    assert result.code == EXIT_BAD_INPUT, result.stderr
    assert len(result.lines) == 1, result.stderr
    (line,) = result.lines
    assert line.startswith("error: "), line
    assert fragment in line, line
    assert "Traceback" not in result.stderr + result.stdout
    assert not (outside / "pwned").exists(), "a pickle was unpickled"
    assert hostile.snapshot(outside) == before  # no output, no temporary file, input unchanged


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimize_refuses(name, case_folder, run_cli):
    path, outside, before = _build(name, case_folder)
    result = run_cli("optimize", path, "-o", "out.onnx", "-p", "default", cwd=path.parent)
    _assert_refused(result, CASES[name][1], outside, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_refuses_with_input_error(name, case_folder):
    path, outside, before = _build(name, case_folder)
    with pytest.raises(InputError) as caught:
        onnxforge.load(path)
    assert CASES[name][1] in str(caught.value)
    assert "\n" not in str(caught.value)
    assert hostile.snapshot(outside) == before


@pytest.mark.parametrize("command", ["inspect", "run", "bench"])
@pytest.mark.parametrize("name", ["ext-symlink-leaving", "deep-if", "raw-data-mismatch"])
def test_every_command_that_reads_a_model_refuses(name, command, case_folder, run_cli):
    path, outside, before = _build(name, case_folder)
    result = run_cli(command, path, cwd=path.parent)
    _assert_refused(result, CASES[name][1], outside, before)


@pytest.mark.parametrize("name", ["random-bytes", "pickle-renamed-onnx", "ext-hard-link"])
def test_refused_in_a_real_process(name, case_folder):
    path, outside, before = _build(name, case_folder)
    result = run_cli_process("optimize", path, "-o", "out.onnx", "-p", "default", cwd=path.parent)
    _assert_refused(result, CASES[name][1], outside, before)


def test_version_refusals_name_what_is_supported(case_folder, run_cli):
    support = runtime_support()
    for name in ("ir-version-too-new", "opset-too-new"):
        path, outside, before = _build(name, case_folder)
        result = run_cli("inspect", path, cwd=path.parent)
        _assert_refused(result, CASES[name][1], outside, before)
        line = result.lines[0]
        assert f"IR version <= {support.ir_version}" in line
        assert f"ai.onnx <= {support.opsets['']}" in line
        path.unlink()


# --- the controls: what the refusals above must not catch ------------------------------------


def test_the_untouched_external_model_loads(case_folder):
    folder, _ = case_folder
    path = hostile.write_external_model(folder, "weights.data", length=str(NBYTES))
    tensor = onnxforge.load(path).graph.initializers["bias"].const_value
    assert tensor.numpy().tobytes() == hostile.bias().tobytes()


def test_external_data_in_a_subfolder_with_a_checksum_loads(case_folder):
    folder, _ = case_folder
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.data").write_bytes(b"\0" * 8 + hostile.bias().tobytes())
    path = hostile.write_external_model(
        folder, "sub/w.data", data=False, offset="8", extra=[("checksum", "ignored")]
    )
    tensor = onnxforge.load(path).graph.initializers["bias"].const_value
    assert tensor.numpy().tobytes() == hostile.bias().tobytes()


def test_a_symlink_inside_the_folder_is_accepted(case_folder):
    folder, _ = case_folder
    hostile.write_external_model(folder, "weights.data")
    (folder / "alias.data").symlink_to("weights.data")
    path = hostile.write_external_model(folder, "alias.data")
    tensor = onnxforge.load(path).graph.initializers["bias"].const_value
    assert tensor.numpy().tobytes() == hostile.bias().tobytes()


def test_if_nested_at_the_limit_loads(case_folder):
    folder, _ = case_folder
    path = folder / "deep.onnx"
    path.write_bytes(hostile.deep_if(MAX_SUBGRAPH_DEPTH))
    model = onnxforge.load(path)
    assert len(list(model.graph.subgraphs())) == 2 * MAX_SUBGRAPH_DEPTH


def test_functions_that_call_each_other_without_recursion_load(case_folder):
    folder, _ = case_folder
    path = folder / "functions.onnx"
    path.write_bytes(hostile.exponential_functions(10))  # 2**10 nodes inlined: fine
    assert len(onnxforge.load(path).functions) == 11


def test_versions_at_the_limit_load(case_folder):
    support = runtime_support()
    folder, _ = case_folder
    path = folder / "newest.onnx"
    path.write_bytes(
        hostile.with_versions(ir_version=support.ir_version, opsets={"": support.opsets[""]})
    )
    model = onnxforge.load(path)
    assert model.ir_version == support.ir_version


def test_a_file_past_2_gib_is_refused_unread(tmp_path, run_cli):
    import time

    from onnxforge.validate import MAX_PROTOBUF_BYTES

    path = tmp_path / "huge.onnx"
    with open(path, "wb") as file:
        file.truncate(MAX_PROTOBUF_BYTES + 1)  # sparse: no disk used, 2 GiB if read
    start = time.monotonic()
    result = run_cli("inspect", path, cwd=tmp_path)
    assert time.monotonic() - start < 5  # parsing 2 GiB would take far longer
    assert result.code == EXIT_BAD_INPUT
    (line,) = result.lines
    assert "past protobuf's 2 GiB limit" in line and "hint:" in line


def test_the_real_command_is_what_these_tests_run():
    # The in-process runner (run_cli) calls the console script's own entry point.
    assert COMMAND[-1] == "onnxforge"
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "onnxforge"]
    assert script.value == "onnxforge.cli:main"


def test_model_bytes_with_external_data_are_refused(tmp_path, monkeypatch):
    # Bytes have no folder: external data would be read relative to the working directory.
    (tmp_path / "weights.data").write_bytes(hostile.bias().tobytes())
    monkeypatch.chdir(tmp_path)
    data = hostile.tiny_proto(hostile.external_bias("weights.data")).SerializeToString()
    with pytest.raises(InputError, match="a model given as bytes cannot have"):
        onnxforge.load(data)

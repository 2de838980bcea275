"""Model I/O: lazy loading, external-data validation, atomic and deterministic saving."""

from __future__ import annotations

import errno
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.errors import InputError
from onnxforge.io import (
    PIPELINE_KEY,
    TEMP_PREFIX,
    VERSION_KEY,
    atomic_write_text,
    external_data_files,
)

# model.onnx -> model.onnx.<16 hex digits of the data's digest>.data
DATA_NAME = re.compile(r"model\.onnx\.[0-9a-f]{16}\.data")


def _op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _folder_contents(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden ones included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _leftovers(folder: pathlib.Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


def _data_file(model_path: pathlib.Path) -> pathlib.Path:
    """The one external data file a saved model refers to."""
    (data_file,) = external_data_files(model_path)
    return data_file


def _rewrite_external_data(source: pathlib.Path, target: pathlib.Path, **entries) -> None:
    """Copy ``source``'s proto to ``target`` with the bias's external_data entries replaced."""
    proto = onnx.load(source, load_external_data=False)
    (tensor,) = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for entry in tensor.external_data:
        if entry.key in entries:
            entry.value = str(entries.pop(entry.key))
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=str(value))
    target.write_bytes(proto.SerializeToString())


# --- load ------------------------------------------------------------------------------------


def test_load_from_path(tiny_model_path, tiny_bias):
    model = onnxforge.load(tiny_model_path)
    assert _op_types(model) == ["Identity", "Relu", "Add"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_load_from_bytes(tiny_model_path, tiny_bias):
    model = onnxforge.load(tiny_model_path.read_bytes())
    assert _op_types(model) == ["Identity", "Relu", "Add"]
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(InputError, match="no such model file") as caught:
        onnxforge.load(missing)
    assert str(missing) in str(caught.value)


def test_load_folder(tmp_path):
    with pytest.raises(InputError, match="not a file") as caught:
        onnxforge.load(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert caught.value.hint


def test_load_non_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are notes, not a model\n")
    with pytest.raises(InputError, match="not a readable ONNX model") as caught:
        onnxforge.load(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_non_onnx_bytes():
    with pytest.raises(InputError, match="not an ONNX model"):
        onnxforge.load(b"these are notes, not a model\n")


def test_load_empty_file_is_refused(tmp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(b"")
    with pytest.raises(InputError):
        onnxforge.load(path)


def test_external_data_is_lazy(tiny_external_path, tiny_bias):
    data_file = _data_file(tiny_external_path)
    assert data_file.stat().st_size == tiny_bias.nbytes
    model = onnxforge.load(tiny_external_path)
    tensor = model.graph.initializers["bias"].const_value
    # Before anything reads it, the weight is still a reference into the .data file.
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.location == data_file.name
    np.testing.assert_array_equal(tensor.numpy(), tiny_bias)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        pytest.param({"location": "ABSOLUTE"}, "not a plain relative path", id="absolute"),
        pytest.param({"location": "../DATA"}, "not a plain relative path", id="dot-dot"),
        pytest.param({"location": "sub/../DATA"}, "not a plain relative path", id="inner-dot-dot"),
        pytest.param({"offset": 4}, "past the end", id="offset-past-end"),
        pytest.param({"length": "LONG"}, "does not match", id="length-past-end"),
    ],
)
def test_external_data_validation_refuses(tiny_external_path, tiny_bias, entries, message):
    data_file = _data_file(tiny_external_path)
    values = {
        "ABSOLUTE": str(data_file.resolve()),
        "../DATA": f"../{tiny_external_path.parent.name}/{data_file.name}",
        "sub/../DATA": f"sub/../{data_file.name}",
        "LONG": tiny_bias.nbytes + 4,
    }
    entries = {key: values.get(value, value) for key, value in entries.items()}
    crafted = tiny_external_path.with_name("crafted.onnx")
    _rewrite_external_data(tiny_external_path, crafted, **entries)
    with pytest.raises(InputError, match=message) as caught:
        onnxforge.load(crafted)
    assert "'bias'" in str(caught.value)


def test_external_data_validation_accepts_the_untouched_entries(tiny_external_path, tiny_bias):
    # The control for the refusals above: the same rewrite with nothing changed loads.
    crafted = tiny_external_path.with_name("crafted.onnx")
    _rewrite_external_data(tiny_external_path, crafted, length=tiny_bias.nbytes)
    model = onnxforge.load(crafted)
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path, tiny_external_path):
    data_file = _data_file(tiny_external_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.data").symlink_to(data_file.resolve())
    crafted = model_dir / "crafted.onnx"
    _rewrite_external_data(tiny_external_path, crafted, location="weights.data")
    with pytest.raises(InputError, match="outside the model's folder"):
        onnxforge.load(crafted)


def test_external_data_symlink_inside_the_folder_is_accepted(tiny_external_path, tiny_bias):
    data_file = _data_file(tiny_external_path)
    (tiny_external_path.parent / "alias.data").symlink_to(data_file.name)
    crafted = tiny_external_path.with_name("crafted.onnx")
    _rewrite_external_data(tiny_external_path, crafted, location="alias.data")
    model = onnxforge.load(crafted)
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_external_data_missing_file_is_refused(tiny_external_path):
    _data_file(tiny_external_path).unlink()
    with pytest.raises(InputError, match="missing"):
        onnxforge.load(tiny_external_path)


def test_external_data_stays_readable_after_chdir(tiny_external_path, tiny_bias, monkeypatch):
    monkeypatch.chdir(tiny_external_path.parent)
    model = onnxforge.load(tiny_external_path.name)
    elsewhere = tiny_external_path.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


# --- save ------------------------------------------------------------------------------------


def test_save_stamps_the_version(tmp_path, make_tiny_model):
    path = onnxforge.save(make_tiny_model(), tmp_path / "model.onnx")
    props = {entry.key: entry.value for entry in onnx.load(path).metadata_props}
    assert props[VERSION_KEY] == onnxforge.__version__
    assert onnxforge.load(path).metadata_props[VERSION_KEY] == onnxforge.__version__


def test_save_is_deterministic(tmp_path, make_tiny_model):
    model = make_tiny_model()
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    onnxforge.save(model, first / "model.onnx", external_data=True)
    onnxforge.save(model, second / "model.onnx", external_data=True)
    contents = _folder_contents(first)
    assert len(contents) == 2 and "model.onnx" in contents
    assert any(DATA_NAME.fullmatch(name) for name in contents)
    assert contents == _folder_contents(second)


SAVE_IN_A_NEW_PROCESS = textwrap.dedent(
    """
    import pathlib, sys
    import onnx_ir as ir
    import onnxforge

    text = pathlib.Path(sys.argv[1]).read_text()
    onnxforge.save(ir.from_onnx_text(text), sys.argv[2], external_data=True)
    """
)


def test_save_is_deterministic_across_processes(tmp_path, tiny_text, make_tiny_model):
    text_file = tmp_path / "tiny.txt"
    text_file.write_text(tiny_text)
    folders = []
    for hash_seed in ("1", "2"):  # different str hashes: set/dict order must not leak out
        folder = tmp_path / f"process-{hash_seed}"
        folder.mkdir()
        subprocess.run(
            [sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(text_file), "model.onnx"],
            cwd=folder,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            check=True,
            capture_output=True,
        )
        folders.append(folder)
    here = tmp_path / "here"
    here.mkdir()
    onnxforge.save(make_tiny_model(), here / "model.onnx", external_data=True)
    expected = _folder_contents(here)
    assert len(expected) == 2 and any(DATA_NAME.fullmatch(name) for name in expected)
    assert [_folder_contents(f) for f in folders] == [expected, expected]


def test_save_refuses_to_overwrite_its_source(tiny_model_path):
    before = tiny_model_path.read_bytes()
    model = onnxforge.load(tiny_model_path)
    with pytest.raises(InputError, match="refusing to overwrite") as caught:
        onnxforge.save(model, tiny_model_path)
    assert caught.value.hint
    assert tiny_model_path.read_bytes() == before


def test_save_refuses_a_hard_link_to_its_source(tiny_model_path):
    before = tiny_model_path.read_bytes()
    link = tiny_model_path.with_name("link.onnx")
    os.link(tiny_model_path, link)
    model = onnxforge.load(tiny_model_path)
    with pytest.raises(InputError, match="refusing to overwrite"):
        onnxforge.save(model, link)
    assert tiny_model_path.read_bytes() == before


def test_save_refuses_to_overwrite_the_data_file_it_reads(tmp_path, tiny_external_path):
    data_file = _data_file(tiny_external_path)
    before = data_file.read_bytes()
    model = onnxforge.load(tiny_external_path)
    with pytest.raises(InputError, match="reads its weights from that file"):
        onnxforge.save(model, data_file)
    other = tmp_path / "other"
    other.mkdir()
    target = other / "model.onnx"
    os.link(data_file, target)  # the same file under another name
    with pytest.raises(InputError, match="reads its weights from that file"):
        onnxforge.save(model, target)
    assert data_file.read_bytes() == before
    assert target.read_bytes() == before


def test_save_leaves_no_temporary_files(tmp_path, make_tiny_model):
    onnxforge.save(make_tiny_model(), tmp_path / "model.onnx", external_data=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx" and DATA_NAME.fullmatch(names[1])


def test_save_failure_leaves_the_target_untouched(
    tmp_path, make_tiny_model, tiny_bias, monkeypatch, request
):
    folder = tmp_path / "out"
    folder.mkdir()
    target = onnxforge.save(make_tiny_model(), folder / "model.onnx", external_data=True)
    before = _folder_contents(folder)
    if os.geteuid() == 0:
        # root ignores directory permissions: make the final rename fail as a full disk would.
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "replace", no_space)
        expected = "the disk is full"
    else:
        folder.chmod(0o500)
        request.addfinalizer(lambda: folder.chmod(0o700))
        expected = "cannot write"
    with pytest.raises(InputError, match=expected):
        onnxforge.save(make_tiny_model(-tiny_bias), target, external_data=True)
    monkeypatch.undo()
    assert _folder_contents(folder) == before
    assert _leftovers(folder) == []
    model = onnxforge.load(target)
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_save_failure_after_the_data_file_leaves_the_target_untouched(
    tmp_path, make_tiny_model, tiny_bias, monkeypatch
):
    target = onnxforge.save(make_tiny_model(), tmp_path / "model.onnx", external_data=True)
    before = _folder_contents(tmp_path)
    real_replace = os.replace

    def fail_on_the_model(src, dst, *args, **kwargs):
        if pathlib.Path(dst).name == target.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fail_on_the_model)
    with pytest.raises(InputError, match="the disk is full"):
        onnxforge.save(make_tiny_model(-tiny_bias), target, external_data=True)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []
    assert _folder_contents(tmp_path) == before


def test_save_never_appends_to_a_stale_data_file(tmp_path, make_tiny_model, tiny_bias):
    target = tmp_path / "model.onnx"
    stale = tmp_path / "model.onnx.data"
    garbage = b"\xff" * (10 * tiny_bias.nbytes)
    stale.write_bytes(garbage)
    new_bias = tiny_bias * 3
    onnxforge.save(make_tiny_model(new_bias), target, external_data=True)
    data_file = _data_file(target)
    assert data_file.stat().st_size == new_bias.nbytes
    assert stale.read_bytes() == garbage  # not ours to touch: no model referred to it
    tensor = onnxforge.load(target).graph.initializers["bias"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.offset == 0
    np.testing.assert_array_equal(tensor.numpy(), new_bias)


def test_atomic_write_text(tmp_path):
    path = tmp_path / "ledger.json"
    assert atomic_write_text(path, "first\n") == path
    text = "second: ünïcødé ✓\n"
    atomic_write_text(path, text)
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    atomic_write_text(path, "old\n")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(InputError, match="the disk is full"):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_atomic_write_text_into_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        atomic_write_text(tmp_path / "missing" / "ledger.json", "text\n")


# --- provenance ------------------------------------------------------------------------------


def test_optimize_stamps_and_appends_the_pipeline(tmp_path, tiny_model_path):
    first = onnxforge.optimize(tiny_model_path, "cleanup")
    assert first.model.metadata_props[PIPELINE_KEY] == "cleanup"
    saved = onnxforge.save(first.model, tmp_path / "once.onnx")
    assert onnxforge.load(saved).metadata_props[PIPELINE_KEY] == "cleanup"
    second = onnxforge.optimize(saved, "cleanup")
    assert second.model.metadata_props[PIPELINE_KEY] == "cleanup,cleanup"

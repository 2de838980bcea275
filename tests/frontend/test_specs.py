"""Model specs: ``.pt2`` archives, ``SPEC@weights`` state dicts, batch and shape options, the CLI.

Untrusted pickles are the point of several tests here: each doctored file carries a payload
that touches a marker file when unpickled, and the test checks both that the spec is refused
and that the marker was never created.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import EXIT_BAD_INPUT, InputError
from onnxforge.frontend import EXPORT_CHECK_META_KEY
from onnxforge.frontend.specs import STATE_DICT_SUFFIXES
from onnxforge.samples import available_samples, get_sample
from onnxforge.samples.digits import build_mlp
from onnxforge.samples.seed_cnn import SeedCNN

# What the export check itself promises for these small float32 models.
EXPORT_CHECK_TOLERANCE = 1e-4
# Weights drawn from another seed change seed-cnn's logits by far more than this.
DIFFERENT_WEIGHTS_REL_L2 = 0.1


class Payload:
    """Unpickling this touches ``marker``: proof that a pickle's code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pickled(obj) -> bytes:
    # Protocol 2, as torch.save writes, so that torch does not warn about the protocol.
    return pickle.dumps(obj, protocol=2)


def run_model(model: ir.Model, *inputs: torch.Tensor) -> list[np.ndarray]:
    names = [v.name for v in model.graph.inputs]
    return Session(model).run({n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def run_torch(module: nn.Module, *inputs: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [module.eval()(*inputs).numpy()]


def assert_refused_without_running(spec: str, marker: pathlib.Path) -> InputError:
    """The spec is refused with InputError, and the payload never ran."""
    with pytest.raises(InputError) as caught:
        try:
            onnxforge.export(spec)
        finally:
            assert not marker.exists(), "the pickle payload was executed"
    assert not marker.exists(), "the pickle payload was executed"
    return caught.value


# --- .pt2 archives -------------------------------------------------------------------------


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()


def images(batch: int, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pt2_archive(tmp_path) -> pathlib.Path:
    """A clean ``torch.export`` archive of ``small_net`` with a static batch of 3."""
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(small_net(), (images(3),)), path)
    return path


def member(archive: pathlib.Path, suffix: str) -> str:
    """The one archive member whose name ends with ``suffix`` (members sit under a root folder)."""
    with zipfile.ZipFile(archive) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
    return name


def rebuild(
    source: pathlib.Path,
    target: pathlib.Path,
    *,
    replace: dict[str, bytes] | None = None,
    rename: dict[str, str] | None = None,
    add: dict[str, bytes] | None = None,
) -> pathlib.Path:
    """Copy every member of ``source`` into ``target``, replacing, renaming or adding some."""
    replace, rename, add = replace or {}, rename or {}, add or {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            if info.filename in rename:
                info = zipfile.ZipInfo(rename[info.filename])
            zout.writestr(info, data)
        for name, data in add.items():
            zout.writestr(zipfile.ZipInfo(name), data)
    return target


def test_pt2_archive_round_trips(tmp_path):
    module = small_net()
    program = torch.export.export(
        module, (images(3),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, path)
    model = onnxforge.export(str(path))
    # The check ran on the archive's own example inputs (batch 3).
    assert [c["batch"] for c in model.meta[EXPORT_CHECK_META_KEY]["checks"]] == [3]
    (x,) = model.graph.inputs
    assert isinstance(x.shape[0], ir.SymbolicDim)
    for batch, seed in ((3, 1), (5, 2)):
        inputs = images(batch, seed=seed)
        got = run_model(model, inputs)
        assert got[0].shape == (batch, 2)
        np.testing.assert_allclose(got[0], run_torch(module, inputs)[0], rtol=1e-5, atol=1e-6)


def test_pt2_archive_with_a_static_batch_keeps_it(pt2_archive):
    model = onnxforge.export(str(pt2_archive))
    assert list(model.graph.inputs[0].shape) == [3, 3, 8, 8]
    inputs = images(3, seed=4)
    np.testing.assert_allclose(
        run_model(model, inputs)[0], run_torch(small_net(), inputs)[0], rtol=1e-5, atol=1e-6
    )


def test_rebuilt_archive_with_benign_sample_inputs_is_accepted(pt2_archive, tmp_path):
    """Control for the doctored archives: rebuilding works, and plain tensors pass the vetting."""
    sample_inputs = member(pt2_archive, "data/sample_inputs/model.pt")
    replacement = torch_saved(((images(3, seed=9),), {}))
    doctored = rebuild(pt2_archive, tmp_path / "benign.pt2", replace={sample_inputs: replacement})
    model = onnxforge.export(str(doctored))
    assert model.meta[EXPORT_CHECK_META_KEY]["rel_l2"] < EXPORT_CHECK_TOLERANCE


@pytest.mark.parametrize("serialize", ["torch.save", "pickle.dumps"])
def test_pt2_with_a_code_payload_in_its_sample_inputs_is_refused(pt2_archive, tmp_path, serialize):
    marker = tmp_path / "pwned"
    payload = ((Payload(marker),), {})
    data = torch_saved(payload) if serialize == "torch.save" else pickled(payload)
    sample_inputs = member(pt2_archive, "data/sample_inputs/model.pt")
    doctored = rebuild(pt2_archive, tmp_path / "evil.pt2", replace={sample_inputs: data})
    error = assert_refused_without_running(str(doctored), marker)
    assert sample_inputs in str(error)
    assert error.hint


@pytest.mark.parametrize("serialize", ["torch.save", "pickle.dumps"])
def test_pt2_with_a_code_payload_as_a_pickled_weight_is_refused(pt2_archive, tmp_path, serialize):
    marker = tmp_path / "pwned"
    config_name = member(pt2_archive, "data/weights/model_weights_config.json")
    with zipfile.ZipFile(pt2_archive) as zf:
        config = json.loads(zf.read(config_name))
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True  # torch.export.load then unpickles it without restriction
    weight = f"{config_name.rsplit('/', 1)[0]}/{entry['path_name']}"
    data = torch_saved(Payload(marker)) if serialize == "torch.save" else pickled(Payload(marker))
    doctored = rebuild(
        pt2_archive,
        tmp_path / "evil.pt2",
        replace={config_name: json.dumps(config).encode(), weight: data},
    )
    error = assert_refused_without_running(str(doctored), marker)
    assert weight in str(error)


def test_pt2_with_an_opaque_object_constant_payload_is_refused(pt2_archive, tmp_path):
    marker = tmp_path / "pwned"
    constants_name = member(pt2_archive, "data/constants/model_constants_config.json")
    weights_name = member(pt2_archive, "data/weights/model_weights_config.json")
    with zipfile.ZipFile(pt2_archive) as zf:
        weight_entry = next(iter(json.loads(zf.read(weights_name))["config"].values()))
    # A float32 tensor_meta gets the entry past torch's flat-tensor pre-read; pad to 4 bytes.
    tensor_meta = {**weight_entry["tensor_meta"], "requires_grad": False}
    data = pickled(Payload(marker))
    data += b"\0" * (-len(data) % 4)
    constants = {
        "config": {
            "evil": {
                "path_name": "opaque_obj_0",
                "is_param": False,
                "use_pickle": False,
                "tensor_meta": tensor_meta,
            }
        }
    }
    folder = constants_name.rsplit("/", 1)[0]
    doctored = rebuild(
        pt2_archive,
        tmp_path / "evil.pt2",
        replace={constants_name: json.dumps(constants).encode()},
        add={f"{folder}/opaque_obj_0": data},
    )
    assert_refused_without_running(str(doctored), marker)


def test_pt2_with_a_payload_under_an_upper_case_member_name_is_refused(pt2_archive, tmp_path):
    marker = tmp_path / "pwned"
    sample_inputs = member(pt2_archive, "data/sample_inputs/model.pt")
    doctored = rebuild(
        pt2_archive,
        tmp_path / "evil.pt2",
        replace={sample_inputs: torch_saved(((Payload(marker),), {}))},
        rename={sample_inputs: sample_inputs[: -len(".pt")] + ".PT"},
    )
    assert_refused_without_running(str(doctored), marker)


def test_missing_pt2_archive(tmp_path):
    with pytest.raises(InputError, match="no such torch.export archive"):
        onnxforge.export(str(tmp_path / "absent.pt2"))


def test_pt2_that_is_not_a_zip(tmp_path):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(InputError, match="not a torch.export archive"):
        onnxforge.export(str(path))


def test_another_batch_for_a_static_pt2_archive_is_an_input_error(pt2_archive):
    with pytest.raises(InputError):
        onnxforge.export(str(pt2_archive), batch=5)


# --- SPEC@weights --------------------------------------------------------------------------


def reseeded_seed_cnn(seed: int = 42) -> nn.Module:
    """seed-cnn's architecture with weights and BatchNorm statistics from another seed."""
    generator = torch.Generator().manual_seed(seed)
    module = SeedCNN()
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.05)
    return module.eval()


def save_state(state: dict[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    if path.suffix == ".npz":
        np.savez(path, **{name: t.numpy() for name, t in state.items()})
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_state_dict_weights_are_loaded(tmp_path, suffix):
    module = reseeded_seed_cnn()
    path = save_state(module.state_dict(), tmp_path / f"weights{suffix}")
    model = onnxforge.export(f"seed-cnn@{path}")
    sample = get_sample("seed-cnn")
    (x,) = sample.example_inputs(3)
    got = run_model(model, x)
    assert compare_outputs(run_torch(module, x), got).rel_l2 < EXPORT_CHECK_TOLERANCE
    default = run_torch(sample.build(), x)
    assert compare_outputs(default, got).rel_l2 > DIFFERENT_WEIGHTS_REL_L2


def write_payload(kind: str, folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    if kind == "torch.save":
        path = folder / "weights.pt"
        torch.save({"features.0.weight": Payload(marker)}, path)
    elif kind == "pickle.dumps":
        path = folder / "weights.pth"
        path.write_bytes(pickled({"features.0.weight": Payload(marker)}))
    elif kind == "npz-object-array":
        path = folder / "weights.npz"
        np.savez(path, **{"features.0.weight": np.array([Payload(marker)], dtype=object)})
    else:  # a bare pickle wearing the .npz suffix
        path = folder / "weights.npz"
        path.write_bytes(pickled(Payload(marker)))
    assert not marker.exists()
    return path


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dumps", "npz-object-array", "npz-pickle"])
def test_state_dict_with_a_code_payload_is_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = write_payload(kind, tmp_path, marker)
    error = assert_refused_without_running(f"seed-cnn@{path}", marker)
    assert str(path) in str(error)


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    path = save_state(build_mlp().state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(InputError, match="do not fit seed-cnn"):
        onnxforge.export(f"seed-cnn@{path}")


def short_classifier_weights(folder: pathlib.Path) -> pathlib.Path:
    """seed-cnn weights whose first classifier layer lacks one input column."""
    state = reseeded_seed_cnn().state_dict()
    state["classifier.1.weight"] = state["classifier.1.weight"][:, :-1].contiguous()
    return save_state(state, folder / "short.npz")


def test_state_dict_with_a_wrong_shape_is_refused(tmp_path):
    with pytest.raises(InputError, match="do not fit seed-cnn"):
        onnxforge.export(f"seed-cnn@{short_classifier_weights(tmp_path)}")


def test_state_dict_shape_error_names_the_tensor(tmp_path):
    with pytest.raises(InputError) as caught:
        onnxforge.export(f"seed-cnn@{short_classifier_weights(tmp_path)}")
    assert "classifier.1.weight" in str(caught.value)


def test_weights_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(InputError, match="does not hold a state dict"):
        onnxforge.export(f"seed-cnn@{path}")


def test_weights_file_of_an_unknown_type_is_refused(tmp_path):
    path = save_state(reseeded_seed_cnn().state_dict(), tmp_path / "weights.pt")
    renamed = path.rename(tmp_path / "weights.safetensors")
    with pytest.raises(InputError, match="unknown weights file type") as caught:
        onnxforge.export(f"seed-cnn@{renamed}")
    assert all(suffix in caught.value.hint for suffix in STATE_DICT_SUFFIXES)


def test_missing_weights_file(tmp_path):
    with pytest.raises(InputError, match="no such weights file"):
        onnxforge.export(f"seed-cnn@{tmp_path / 'absent.pt'}")


# --- batch= and input_shapes= ----------------------------------------------------------------


def test_batch_sets_the_example_batch():
    model = onnxforge.export("mlp", batch=3)
    checks = model.meta[EXPORT_CHECK_META_KEY]["checks"]
    # The example batch, then one more row for the dynamic-batch check.
    assert [c["batch"] for c in checks] == [3, 4]
    assert isinstance(model.graph.inputs[0].shape[0], ir.SymbolicDim)


def test_batch_with_a_static_batch_is_baked_in():
    model = onnxforge.export("mlp", batch=3, dynamic_batch=False)
    assert list(model.graph.inputs[0].shape) == [3, 64]
    assert list(model.graph.outputs[0].shape) == [3, 10]
    (x,) = get_sample("mlp").example_inputs(3)
    got = run_model(model, x)
    assert compare_outputs(run_torch(build_mlp(), x), got).rel_l2 < EXPORT_CHECK_TOLERANCE


def test_batch_below_one_is_refused():
    with pytest.raises(InputError, match="at least 1"):
        onnxforge.export("mlp", batch=0)


def test_input_shapes_replace_a_spec_input():
    model = onnxforge.export("mlp", input_shapes={"x": (5, 64)}, dynamic_batch=False)
    assert list(model.graph.inputs[0].shape) == [5, 64]
    assert [c["batch"] for c in model.meta[EXPORT_CHECK_META_KEY]["checks"]] == [5]


def test_input_shapes_change_more_than_the_batch():
    module = small_net()
    model = onnxforge.export(
        module, (images(2),), input_shapes={"input": (2, 3, 20, 20)}, dynamic_batch=False
    )
    assert list(model.graph.inputs[0].shape) == [2, 3, 20, 20]
    x = images(2, size=20, seed=5)
    np.testing.assert_allclose(
        run_model(model, x)[0], run_torch(module, x)[0], rtol=1e-5, atol=1e-6
    )


def test_input_shapes_naming_an_unknown_input():
    with pytest.raises(InputError, match="pixels") as caught:
        onnxforge.export("mlp", input_shapes={"pixels": (2, 64)})
    assert "x" in caught.value.hint


# --- the command line ----------------------------------------------------------------------


def cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # A fixed width, so that rich tables do not wrap cells differently from one terminal to
    # the next.
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "onnxforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def input_dims(path: pathlib.Path) -> list[int | str]:
    (value,) = onnx.load(path).graph.input
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_cli_export_with_a_static_batch(tmp_path):
    result = cli("export", "mlp", "-o", "out.onnx", "--batch", "3", "--static", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "out.onnx"
    assert input_dims(path) == [3, 64]
    (x,) = get_sample("mlp").example_inputs(3)
    got = Session(path).run({"x": x.numpy()})
    assert compare_outputs(run_torch(build_mlp(), x), got).rel_l2 < EXPORT_CHECK_TOLERANCE


def test_cli_export_with_an_input_shape(tmp_path):
    result = cli(
        "export", "mlp", "-o", "out.onnx", "--input-shape", "x=5x64", "--static", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert input_dims(tmp_path / "out.onnx") == [5, 64]


def test_cli_refuses_a_weights_file_with_a_code_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = write_payload("torch.save", tmp_path, marker)
    result = cli("export", f"mlp@{path}", "-o", "out.onnx", cwd=tmp_path)
    assert result.returncode == EXIT_BAD_INPUT
    assert not marker.exists()
    assert not (tmp_path / "out.onnx").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refusing"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_lists_every_sample(tmp_path):
    result = cli("samples", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The first cell of each table row (rows start with a vertical bar).
    listed = {
        line.strip("│ ").split("│")[0].strip()
        for line in result.stdout.splitlines()
        if line.startswith("│")
    }
    assert listed - {""} == set(available_samples())

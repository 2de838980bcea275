"""make_inputs and load_inputs: seeded random inputs shaped and typed like the model's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.backend import Session, input_specs, load_inputs, make_inputs
from onnxforge.backend.inputs import DEFAULT_SYMBOLIC_DIM
from onnxforge.errors import InputError

MULTI_INPUT_TEXT = """
<ir_version: 10, opset_import: ["" : 20]>
multi (float[N, S, 8] x, int64[N, S] ids, bool[N] flag, int64[N, S] attention_mask)
    => (float[N, S, 8] x_out, int64[N, S] ids_out, bool[N] flag_out, int64[N, S] mask_out)
{
    x_out = Identity(x)
    ids_out = Identity(ids)
    flag_out = Identity(flag)
    mask_out = Identity(attention_mask)
}
"""


@pytest.fixture
def multi_model() -> ir.Model:
    return ir.from_onnx_text(MULTI_INPUT_TEXT)


def test_input_specs(multi_model):
    specs = {spec.name: spec for spec in input_specs(multi_model)}
    assert list(specs) == ["x", "ids", "flag", "attention_mask"]
    assert specs["x"].shape == ("N", "S", 8)
    assert specs["x"].dtype == np.float32
    assert specs["flag"].dtype == np.bool_


def test_shapes_follow_batch_and_dims(multi_model):
    inputs = make_inputs(multi_model, batch=3, dims={"S": 7})
    assert {name: a.shape for name, a in inputs.items()} == {
        "x": (3, 7, 8),
        "ids": (3, 7),
        "flag": (3,),
        "attention_mask": (3, 7),
    }


def test_unbound_symbolic_dims_get_the_default(multi_model):
    inputs = make_inputs(multi_model, batch=2)
    assert inputs["x"].shape == (2, DEFAULT_SYMBOLIC_DIM, 8)
    assert inputs["ids"].shape == (2, DEFAULT_SYMBOLIC_DIM)


def test_dtypes_follow_the_model(multi_model):
    inputs = make_inputs(multi_model, batch=64, dims={"S": 16})
    assert inputs["x"].dtype == np.float32
    assert inputs["ids"].dtype == np.int64
    assert inputs["flag"].dtype == np.bool_
    assert set(np.unique(inputs["ids"])) == {0, 1}
    assert set(np.unique(inputs["flag"])) == {False, True}
    # The generated inputs are what ONNX Runtime accepts for this model.
    outputs = Session(multi_model).run(inputs)
    for value, got in zip(inputs.values(), outputs, strict=True):
        np.testing.assert_array_equal(got, value)


def test_mask_inputs_are_ones(multi_model):
    mask = make_inputs(multi_model, batch=4, dims={"S": 5})["attention_mask"]
    np.testing.assert_array_equal(mask, np.ones((4, 5), dtype=np.int64))


def test_float_mask_inputs_are_ones():
    model = ir.from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        masked (float[N, S] attention_mask) => (float[N, S] y) { y = Identity(attention_mask) }
        """
    )
    mask = make_inputs(model, batch=2, dims={"S": 3})["attention_mask"]
    np.testing.assert_array_equal(mask, np.ones((2, 3), dtype=np.float32))


def test_seeded(multi_model):
    first = make_inputs(multi_model, batch=4, dims={"S": 8}, seed=3)
    again = make_inputs(multi_model, batch=4, dims={"S": 8}, seed=3)
    other = make_inputs(multi_model, batch=4, dims={"S": 8}, seed=4)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["x"], other["x"])
    assert not np.array_equal(first["ids"], other["ids"])


def test_initializers_are_not_inputs(make_tiny_model):
    model = make_tiny_model()
    model.graph.inputs.append(model.graph.initializers["bias"])
    assert list(make_inputs(model)) == ["x"]


def test_load_inputs_from_npz(tmp_path):
    arrays = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([[1, 0, 1]], dtype=np.int64),
    }
    path = tmp_path / "inputs.npz"
    np.savez(path, **arrays)
    loaded = load_inputs(path)
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


def test_load_inputs_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([{"payload": "runs on load"}], dtype=object))
    with pytest.raises(InputError, match="not a readable .npz") as caught:
        load_inputs(path)
    assert str(path) in str(caught.value)


def test_load_inputs_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such inputs file"):
        load_inputs(tmp_path / "missing.npz")


def test_load_inputs_not_an_npz(tmp_path):
    path = tmp_path / "inputs.npz"
    path.write_text("x = 1\n")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_inputs(path)

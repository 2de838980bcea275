"""Resource bounds: tiny models that ask for huge tensors, deep bodies, exponential functions.

A model may ask for a tensor of hundreds of GiB with a few bytes (a constant shape). Within the
1 TiB validation budget the model loads, and the passes must not materialise it: folding is
refused before anything is evaluated (fold-constants' ``output_size_limit``) and the pipeline
finishes in moments. Running such a model is ONNX Runtime's refusal, reported as one line.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxforge
from onnxforge.errors import EXIT_BAD_INPUT, InputError
from onnxforge.passes.fold_constants import DEFAULT_OUTPUT_SIZE_LIMIT, FoldConstantsPass
from onnxforge.validate import MAX_SUBGRAPH_DEPTH

from . import hostile

# 2**36 float32 elements: 256 GiB, under the validation budget and far over any test machine.
HUGE = [1 << 16, 1 << 16, 1 << 4]
SECONDS = 20  # a pipeline that materialised any of these would not finish (or would crash)


def _int64(name: str, values) -> object:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _huge_broadcast(op: str) -> bytes:
    """``op`` (Expand or Tile) of a 1x1x1 tensor to the HUGE shape, then reduced to a scalar."""
    nodes = [
        helper.make_node(op, ["one", "shape"], ["big"], name="big"),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    one = numpy_helper.from_array(np.ones((1, 1, 1), np.float32), "one")
    return hostile.model_proto(nodes, initializers=[one, _int64("shape", HUGE)]).SerializeToString()


def _huge_range() -> bytes:
    nodes = [
        helper.make_node("Range", ["start", "limit", "delta"], ["big"], name="big"),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["f"], to=1),
        helper.make_node("Add", ["x", "f"], ["y"]),
    ]
    scalars = [_int64("start", 0), _int64("limit", 1 << 36), _int64("delta", 1)]
    return hostile.model_proto(nodes, initializers=scalars).SerializeToString()


HUGE_MODELS = {
    "constant-of-shape": lambda: hostile.constant_of_shape(HUGE),
    "expand": lambda: _huge_broadcast("Expand"),
    "tile": lambda: _huge_broadcast("Tile"),
    "range": _huge_range,
}


@pytest.mark.parametrize("kind", sorted(HUGE_MODELS))
def test_folding_refuses_huge_tensors_before_evaluating(kind, tmp_path):
    path = tmp_path / "huge.onnx"
    path.write_bytes(HUGE_MODELS[kind]())
    model = onnxforge.load(path)
    fold = FoldConstantsPass()
    start = time.monotonic()
    result = onnxforge.optimize(model, [fold, "cleanup", "fuse"], verify="structure")
    assert time.monotonic() - start < SECONDS
    (skipped,) = [s for s in fold.skipped if s.node in ("big", "zeros")]
    assert f"output_size_limit={DEFAULT_OUTPUT_SIZE_LIMIT}" in skipped.reason
    assert "68719476736 elements" in skipped.reason  # 2**36, computed from shapes alone
    ops = {node.op_type for node in result.model.graph}
    assert ops & {"ConstantOfShape", "Expand", "Tile", "Range"}  # still there, not folded
    saved = onnxforge.save(result.model, tmp_path / "out.onnx")
    assert saved.stat().st_size < 10_000  # nothing huge was stored


def test_running_a_huge_tensor_is_one_clean_error(tmp_path, run_cli):
    path = tmp_path / "huge.onnx"
    path.write_bytes(hostile.constant_of_shape(HUGE))
    result = run_cli("run", path, cwd=tmp_path)
    assert result.code == EXIT_BAD_INPUT, result.stderr
    (line,) = result.lines
    assert line.startswith("error: ONNX Runtime failed to run the model:")
    assert "allocate" in line


def test_subgraphs_at_the_depth_limit_go_through_the_default_pipeline(tmp_path, run_cli):
    path = tmp_path / "deep.onnx"
    path.write_bytes(hostile.deep_if(MAX_SUBGRAPH_DEPTH))
    result = run_cli("optimize", path, "-o", "out.onnx", "-p", "default", cwd=tmp_path)
    assert result.code == 0, result.stderr
    x = np.linspace(-1, 1, 2 * hostile.WIDTH, dtype=np.float32).reshape(2, hostile.WIDTH)
    from onnxforge.backend import Session

    for cond in (True, False):
        (y,) = Session(tmp_path / "out.onnx").run({"c": np.array(cond), "x": x})
        np.testing.assert_array_equal(y, x)  # both branches of every If copy x


def test_exponential_functions_are_refused_without_expanding_them(tmp_path):
    path = tmp_path / "bomb.onnx"
    path.write_bytes(hostile.exponential_functions(60))  # 2**60 nodes once inlined
    start = time.monotonic()
    with pytest.raises(InputError, match="once its function calls are inlined"):
        onnxforge.load(path)
    assert time.monotonic() - start < 2

"""Pipeline-level tests: several orderings of the same passes on the bundled samples.

Each ordering runs under numeric verification (every pass is held to its own tolerance), and
the final outputs must match the export's within the tolerance of the loosest semantics used.
"""

from __future__ import annotations

import itertools

import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.presets import PRESETS

PASSES = ("fold-constants", "cleanup", "fuse")
ORDERINGS = [",".join(p) for p in itertools.permutations(PASSES)]
REASSOCIATING_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["seed-cnn", "digits-cnn", "transformer"])
def exported(request):
    model = onnxforge.export(request.param)
    inputs = make_inputs(model, batch=3, dims={"sequence": 16}, seed=4)
    return model, inputs, Session(model).run(inputs)


@pytest.mark.parametrize("pipeline", ORDERINGS)
def test_every_ordering_keeps_the_outputs(exported, pipeline):
    model, inputs, expected = exported
    result = onnxforge.optimize(model.clone(), pipeline, verify="numeric", inputs=inputs)
    assert [r.status for r in result.records] == ["ok"] * 3
    assert result.pipeline == pipeline
    comparison = compare_outputs(expected, Session(result.model).run(inputs))
    assert comparison.finite and comparison.rel_l2 <= REASSOCIATING_TOLERANCE


def test_the_default_preset_shrinks_the_transformer():
    model = onnxforge.export("transformer")
    before = sum(1 for _ in model.graph.all_nodes())
    result = onnxforge.optimize(model, PRESETS["default"], verify="structure")
    after = sum(1 for _ in result.model.graph.all_nodes())
    assert after < before / 2
    ops = {node.op_type for node in result.model.graph.all_nodes()}
    # the cpu target writes fused residual layer norms as Sum + LayerNormalization
    assert {"Attention", "Sum", "LayerNormalization"} <= ops

"""``onnxforge.ensemble``: members merged into one graph, checked against running them apart."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_cli import cli  # the CLI run as a user runs it (tests/ is on sys.path)

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.ensemble import ENSEMBLE_META_KEY, MIN_OPSET, ensemble, member_names
from onnxforge.errors import InputError
from onnxforge.passes.prune import PrunePass

CLASSES = 5


def linear_model(seed: int, *, opset: int = 20, signature: str = "float[N,4] x") -> ir.Model:
    """``y = x @ W + b`` with seeded weights: a tiny classifier over CLASSES classes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, CLASSES)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    weights = ", ".join(repr(float(v)) for v in w.ravel())
    bias = ", ".join(repr(float(v)) for v in b)
    return ir.from_onnx_text(
        f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g ({signature}) => (float[N,{CLASSES}] y)
            <float[4,{CLASSES}] w = {{{weights}}}, float[{CLASSES}] b = {{{bias}}}>
        {{
            h = MatMul({signature.split()[-1]}, w)
            y = Add(h, b)
        }}
        """
    )


def feed(rows: int = 6, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)}


def combine(outputs: list[np.ndarray], mode: str) -> np.ndarray:
    """What the ensemble should compute, in numpy."""
    if mode == "mean":
        return np.mean(outputs, axis=0)
    if mode == "max":
        return np.max(outputs, axis=0)
    classes = outputs[0].shape[-1]
    return sum(np.eye(classes, dtype=outputs[0].dtype)[o.argmax(axis=-1)] for o in outputs)


def run_apart(models: list[ir.Model], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [Session(m).run(inputs)[0] for m in models]


@pytest.mark.parametrize("mode", ["mean", "max", "vote"])
def test_matches_the_members_run_apart_and_combined(mode):
    members = [linear_model(seed) for seed in range(3)]
    merged = ensemble(members, mode=mode)
    inputs = feed(rows=32)
    got = Session(merged).run(inputs)
    assert len(got) == 1
    expected = combine(run_apart(members, inputs), mode)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6, atol=1e-6)
    if mode == "vote":  # counts of members, one vote per member and row
        assert np.all(got[0].sum(axis=-1) == len(members))


def test_vote_argmax_is_the_majority_class():
    members = [linear_model(seed) for seed in range(5)]
    inputs = feed(rows=64)
    votes = Session(ensemble(members, mode="vote")).run(inputs)[0]
    choices = np.stack([o.argmax(axis=-1) for o in run_apart(members, inputs)])
    for row in range(64):
        counts = np.bincount(choices[:, row], minlength=CLASSES)
        assert votes[row].argmax() == counts.argmax()  # ties: lowest class, as np.argmax


def test_inputs_are_shared_and_every_name_is_prefixed_and_unique():
    members = [linear_model(0), linear_model(1)]
    merged = ensemble(members, names=["first", "second"])
    assert [v.name for v in merged.graph.inputs] == ["x"]
    assert [v.name for v in merged.graph.outputs] == ["y"]
    assert sorted(merged.graph.initializers) == ["first.b", "first.w", "second.b", "second.w"]
    values = [o.name for node in merged.graph for o in node.outputs]
    assert len(values) == len(set(values))
    assert {n.name for n in merged.graph if n.name} >= {"ensemble.y.mean"}
    onnx.checker.check_model(ir.to_proto(merged), full_check=True)
    meta = json.loads(merged.metadata_props[ENSEMBLE_META_KEY])
    assert meta == {"mode": "mean", "match_inputs": "name", "members": ["first", "second"]}


def test_members_are_left_unchanged():
    members = [linear_model(0), linear_model(1)]
    before = [ir.to_proto(m).SerializeToString() for m in members]
    ensemble(members, mode="vote")
    assert [ir.to_proto(m).SerializeToString() for m in members] == before


def test_member_names_are_word_characters_and_unique():
    assert member_names(["a-b", "a b", "", "m2"]) == ["a_b", "a_b_2", "m2", "m2_2"]
    assert member_names(["ensemble"]) == ["ensemble_2"]  # reserved for the combining nodes


@pytest.fixture(scope="module")
def digits_variants() -> list[ir.Model]:
    """digits-cnn and its half-channel pruned variant (different weights and widths)."""
    exported = onnxforge.export("digits-cnn")
    pruning = [PrunePass(granularity="channel", sparsity=0.5)]
    return [exported, onnxforge.optimize(exported.clone(), pruning).model]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mean", "vote"])
def test_passes_optimise_the_ensemble_as_one_model(digits_variants, mode):
    from onnxforge.samples import get_sample

    inputs, _ = get_sample("digits-cnn").evaluation_data()
    expected = combine(run_apart(digits_variants, inputs), mode)
    merged = ensemble(digits_variants, mode=mode)
    np.testing.assert_allclose(Session(merged).run(inputs)[0], expected, rtol=1e-6, atol=1e-6)
    nodes = merged.graph.num_nodes()
    result = onnxforge.optimize(merged, "fold-constants,cleanup,fuse", verify="numeric")
    assert all(record.status == "ok" for record in result.records)
    ops = [node.op_type for node in result.model.graph]
    # Both members were rewritten: every BatchNormalization folded into its convolution
    # (a Conv, or a FusedConv that took the Relu too), three per member.
    assert "BatchNormalization" not in ops
    assert sum(op in ("Conv", "FusedConv") for op in ops) == 6
    assert result.model.graph.num_nodes() < nodes
    got = Session(result.model).run(inputs)[0]
    if mode == "vote":
        np.testing.assert_array_equal(got, expected)
    else:  # fold-constants and fuse reassociate: the reassociating tolerance
        assert compare_outputs([expected], [got]).rel_l2 < 1e-4


def test_a_fixed_dimension_wins_over_a_symbolic_one():
    merged = ensemble([linear_model(0), linear_model(1, signature="float[3,4] x")])
    (value,) = merged.graph.inputs
    assert list(value.shape) == [3, 4]
    assert Session(merged).run(feed(rows=3))[0].shape == (3, CLASSES)


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ("float[N,5] x", "incompatible input 'x': float[N,4] in m0; float[N,5] in m1"),
        ("double[N,4] x", "incompatible input 'x'"),
        ("float[N,2,2] x", "incompatible input 'x'"),
        ("float[N,4] features", "m0 takes (x), m1 takes (features)"),
    ],
)
def test_incompatible_inputs_are_a_clear_error(signature, message):
    other = ir.from_onnx_text(  # a second member whose input differs
        f"""
        <ir_version: 10, opset_import: ["" : 20]>
        g ({signature}) => (float[N,{CLASSES}] y)
        {{
            y = Identity({signature.split()[-1]})
        }}
        """
    )
    with pytest.raises(InputError) as caught:
        ensemble([linear_model(0), other])
    assert message in str(caught.value)
    assert caught.value.hint


def test_position_matching_joins_inputs_of_different_names():
    renamed = linear_model(1, signature="float[N,4] features")
    with pytest.raises(InputError, match="m0 takes \\(x\\), m1 takes \\(features\\)") as caught:
        ensemble([linear_model(0), renamed])
    assert "--match-inputs position" in caught.value.hint
    merged = ensemble([linear_model(0), renamed], match_inputs="position", mode="max")
    assert [v.name for v in merged.graph.inputs] == ["x"]
    inputs = feed()
    expected = np.maximum(
        Session(linear_model(0)).run(inputs)[0],
        Session(renamed).run({"features": inputs["x"]})[0],
    )
    np.testing.assert_allclose(Session(merged).run(inputs)[0], expected, rtol=1e-6)


def test_different_output_counts_are_refused():
    two = ir.from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) { y = Relu(x)  z = Neg(x) }
        """
    )
    with pytest.raises(InputError, match="different numbers of outputs"):
        ensemble([linear_model(0), two])


def test_vote_needs_float_scores():
    ints = ir.from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        g (float[N,4] x) => (int64[N] y) { y = ArgMax<axis=1, keepdims=0>(x) }
        """
    )
    with pytest.raises(InputError, match="vote needs float outputs"):
        ensemble([ints, ints.clone()], mode="vote")
    with pytest.raises(InputError, match="mean needs float outputs"):
        ensemble([ints, ints.clone()], mode="mean")
    merged = ensemble([ints, ints.clone()], mode="max")  # max of int64 is fine
    inputs = feed()
    np.testing.assert_array_equal(Session(merged).run(inputs)[0], inputs["x"].argmax(axis=1))


def test_fewer_than_two_models_or_an_unknown_mode_are_refused():
    with pytest.raises(InputError, match="at least two"):
        ensemble([linear_model(0)])
    with pytest.raises(InputError, match="unknown ensemble mode 'median'"):
        ensemble([linear_model(0), linear_model(1)], mode="median")


def test_members_at_older_opsets_are_converted():
    old = ir.from_onnx_text(  # ReduceMean's axes became an input at opset 18
        """
        <ir_version: 8, opset_import: ["" : 13]>
        old (float[N,4] x) => (float[N,1] y) { y = ReduceMean<axes=[1]>(x) }
        """
    )
    new = ir.from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        new (float[N,4] x) => (float[N,1] y) {
            axes = Constant<value=int64[1] {1}>()
            y = ReduceMax(x, axes)
        }
        """
    )
    merged = ensemble([old, new])
    assert merged.opset_imports[""] == 18
    assert old.opset_imports[""] == 13  # the member itself is untouched
    x = feed()["x"]
    got = Session(merged).run({"x": x})[0]
    np.testing.assert_allclose(got[:, 0], (x.mean(axis=1) + x.max(axis=1)) / 2, rtol=1e-6)


def test_the_merged_opset_is_at_least_the_minimum():
    members = [linear_model(0, opset=13), linear_model(1, opset=13)]
    assert ensemble(members, mode="vote").opset_imports[""] == max(13, MIN_OPSET)


def test_custom_domains_at_different_versions_are_refused():
    def custom(version: int) -> ir.Model:
        model = linear_model(version)
        model.opset_imports["com.example"] = version
        return model

    with pytest.raises(InputError, match="domain 'com.example' at different versions"):
        ensemble([custom(1), custom(2)])


def test_clashing_local_functions_are_renamed():
    def with_function(op: str) -> ir.Model:
        return ir.from_onnx_text(
            f"""
            <ir_version: 10, opset_import: ["" : 18, "local" : 1]>
            g (float[N,4] x) => (float[N,4] y) {{ y = local.f(x) }}
            <domain: "local", opset_import: ["" : 18]>
            f (a) => (b) {{ b = {op}(a) }}
            """
        )

    merged = ensemble([with_function("Relu"), with_function("Neg")], mode="max")
    assert sorted(f.name for f in merged.functions.values()) == ["f", "m1_f"]
    x = feed()["x"]
    got = Session(merged).run({"x": x})[0]
    np.testing.assert_array_equal(got, np.maximum(np.maximum(x, 0), -x))


def test_cli_writes_one_model_that_runs_as_the_members_combined(tmp_path):
    members = [linear_model(0), linear_model(1)]
    for name, model in zip(("a", "b"), members, strict=True):
        onnxforge.save(model, tmp_path / f"{name}.onnx")
    result = cli("ensemble", "a.onnx", "b.onnx", "-o", "ab.onnx", "--mode", "max", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote ab.onnx" in result.stdout
    merged = onnxforge.load(tmp_path / "ab.onnx")
    assert sorted(merged.graph.initializers) == ["a.b", "a.w", "b.b", "b.w"]
    inputs = feed()
    expected = combine(run_apart(members, inputs), "max")
    np.testing.assert_allclose(Session(merged).run(inputs)[0], expected, rtol=1e-6)


def test_cli_incompatible_inputs_are_one_error_line(tmp_path):
    onnxforge.save(linear_model(0), tmp_path / "a.onnx")
    onnxforge.save(linear_model(1, signature="float[N,4] features"), tmp_path / "b.onnx")
    result = cli("ensemble", "a.onnx", "b.onnx", "-o", "ab.onnx", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: incompatible inputs: a takes (x), b takes (features)")
    assert not (tmp_path / "ab.onnx").exists()

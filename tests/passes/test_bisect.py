"""Bisecting into a rule set: ``fuse``'s rewrite limit, ``bisect_pipeline``'s rewrite search,
and ``onnxforge optimize --bisect``.

The broken model is real: fuse's ``binary_masks`` rule assumes a 0/1 attention mask, and a mask
holding a 2 makes its one rewrite change the outputs, while every other rewrite of the attention
block (SDPA, MHA, bias, Attention) stays within the reassociating tolerance.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.passes import DEFAULT_TOLERANCES, PassManager, Semantics, bisect_pipeline
from onnxforge.passes.fuse import FusePass, Rewrite

from .conftest import as_text, build, run
from .test_fuse import mask_inputs, mask_text

TOLERANCE = DEFAULT_TOLERANCES[Semantics.REASSOCIATING]
TRANSFORMER = ("transformer",)


def non_binary_feeds() -> dict[str, np.ndarray]:
    """A mask with a 2 among its 1s: what the binary_masks rule assumes never happens."""
    feeds = mask_inputs()
    feeds["attention_mask"][:2, 1] = 2
    return feeds


def drift(model, fused, feeds) -> float:
    return compare_outputs(run(model, feeds), run(fused, feeds)).rel_l2


# --- fuse's rewrite limit ---------------------------------------------------------------------


def test_a_limited_fuse_applies_the_first_rewrites_in_order() -> None:
    model = build(mask_text())
    before = as_text(model)
    full = FusePass(rules=TRANSFORMER).with_rewrite_limit(None)
    unlimited = full(model).model
    applied = full.applied_rewrites
    assert all(isinstance(r, Rewrite) for r in applied)
    assert [r.stage for r in applied][0] == "sdpa" and applied[-1].stage == "attention-mask"
    assert applied[-1].rule == "BinaryMaskIndex"
    # the same model as the pass without a limit, which records nothing
    plain = FusePass(rules=TRANSFORMER)
    assert as_text(plain(model).model) == as_text(unlimited)
    assert plain.applied_rewrites == []
    for limit in range(len(applied) + 1):
        limited = FusePass(rules=TRANSFORMER).with_rewrite_limit(limit)
        result = limited(model)
        assert limited.applied_rewrites == applied[:limit]
        assert result.modified is (limit > 0)
        # never a temporary fusion op left behind, whatever the limit
        assert not [n for n in result.model.graph if n.domain.startswith("ai.onnxruntime")]
        # each prefix of the rewrites is a valid model computing the same on 0/1 masks
        assert drift(model, result.model, mask_inputs()) <= TOLERANCE
    assert as_text(model) == before


def test_only_the_mask_rewrite_changes_outputs_on_a_non_binary_mask() -> None:
    model, feeds = build(mask_text()), non_binary_feeds()
    count = len(_applied(model))
    drifts = [
        drift(model, FusePass(rules=TRANSFORMER).with_rewrite_limit(k)(model).model, feeds)
        for k in range(count + 1)
    ]
    assert all(d <= TOLERANCE for d in drifts[:-1]) and drifts[-1] > 0.1


def _applied(model) -> list[Rewrite]:
    counted = FusePass(rules=TRANSFORMER).with_rewrite_limit(None)
    counted(model)
    return counted.applied_rewrites


# --- bisect_pipeline into the rewrites ------------------------------------------------------------


def bisect(model, pipeline: str, feeds, **kwargs):
    return bisect_pipeline(
        model, pipeline, runner=Session.runner(), compare=compare_outputs, inputs=feeds, **kwargs
    )


def test_bisect_names_the_first_bad_rewrite_inside_fuse() -> None:
    model, feeds = build(mask_text()), non_binary_feeds()
    result = bisect(model, "cleanup,fuse{rules=transformer},cleanup", feeds)
    assert result.index == 1 and result.pass_text == "fuse{rules=transformer}"
    rewrite = result.rewrite
    applied = _applied(PassManager("cleanup").run(build(mask_text())).model)
    assert rewrite.count == len(applied)
    assert (rewrite.stage, rewrite.rule) == ("attention-mask", "BinaryMaskIndex")
    assert rewrite.index == len(applied) - 1 and rewrite.nodes == applied[-1].nodes
    assert rewrite.drift["rel_l2"] > 0.1 and result.final["rel_l2"] > 0.1
    assert rewrite.probes <= 1 + len(applied).bit_length()
    assert str(rewrite).startswith(f"rewrite #{len(applied)} of {len(applied)}: BinaryMaskIndex")
    # what it claims: one rewrite fewer is within tolerance, this one is not
    before = PassManager("cleanup").run(build(mask_text())).model
    good = FusePass(rules=TRANSFORMER).with_rewrite_limit(rewrite.index)(before).model
    bad = FusePass(rules=TRANSFORMER).with_rewrite_limit(rewrite.index + 1)(before).model
    assert drift(model, good, feeds) <= 1e-4 < drift(model, bad, feeds)


def test_bisect_without_rewrites_or_without_a_rule_set() -> None:
    model, feeds = build(mask_text()), non_binary_feeds()
    assert bisect(model, "fuse{rules=transformer}", feeds, rewrites=False).rewrite is None
    clean = bisect(model, "cleanup,fuse{rules=transformer,binary_masks=false}", feeds)
    assert not clean.found and clean.rewrite is None and clean.final["rel_l2"] <= 1e-4


def test_a_culprit_that_cannot_count_rewrites_is_named_alone(scaled_relu) -> None:
    feeds = {"x": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)}
    result = bisect(scaled_relu, "cleanup,test-relu-to-sigmoid,collapse-relu", feeds)
    assert result.pass_text == "test-relu-to-sigmoid" and result.rewrite is None


# --- the command line -------------------------------------------------------------------------


def cli(*args, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxforge", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def mask_files(tmp_path) -> pathlib.Path:
    onnxforge.save(build(mask_text()), tmp_path / "mask.onnx")
    np.savez(tmp_path / "feeds.npz", **non_binary_feeds())
    return tmp_path


def optimize_bisect(folder: pathlib.Path, pipeline: str, *extra: str, output: str = "out.onnx"):
    """``onnxforge optimize mask.onnx -o OUTPUT -p PIPELINE --inputs feeds.npz --bisect``."""
    return cli(
        "optimize", "mask.onnx", "-o", output, "-p", pipeline, "--inputs", "feeds.npz",
        "--bisect", *extra, cwd=folder,
    )  # fmt: skip


def test_optimize_bisect_prints_the_pass_and_the_rewrite_and_fails(mask_files) -> None:
    result = optimize_bisect(mask_files, "cleanup,fuse")
    assert result.returncode == 1, result.stderr
    assert "#1 fuse" in result.stdout
    assert "BinaryMaskIndex (attention-mask)" in result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: pass #1 'fuse' (after cleanup): the final outputs drift")
    assert "first bad rewrite #" in line and "hint:" in line
    assert not (mask_files / "out.onnx").exists()


def test_optimize_bisect_passes_a_pipeline_within_tolerance(mask_files) -> None:
    result = optimize_bisect(mask_files, "cleanup,fuse{binary_masks=false}")
    assert result.returncode == 0, result.stderr
    assert "bisect: the final outputs are within tolerance" in result.stdout
    assert (mask_files / "out.onnx").exists()
    # a looser tolerance accepts the mask rewrite too
    result = optimize_bisect(
        mask_files, "cleanup,fuse", "--bisect-tolerance", "10", output="out2.onnx"
    )
    assert result.returncode == 0, result.stderr
    assert (mask_files / "out2.onnx").exists()

"""compare_outputs: the figures that verification and export checks rely on."""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.backend import compare_outputs


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    return np.sum(r * g, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1))


def test_identical_outputs(rng):
    logits = rng.standard_normal((4, 10)).astype(np.float32)
    features = rng.standard_normal((4, 3, 5)).astype(np.float32)
    result = compare_outputs([logits, features], [logits.copy(), features.copy()])
    assert result.max_abs == 0.0
    assert result.rel_l2 == 0.0
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1 == 1.0
    assert result.finite is True


def test_known_perturbation(rng):
    ref = rng.standard_normal((6, 10))
    delta = 1e-3 * rng.standard_normal((6, 10))
    got = ref + delta
    # Flip the winner of row 2 so that exactly one row disagrees on top-1.
    winner, runner_up = np.argsort(ref[2])[-1], np.argsort(ref[2])[-2]
    got[2, runner_up] = ref[2, winner] + 1.0
    diff = got - ref
    result = compare_outputs([ref], [got])
    assert result.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-12)
    assert result.rel_l2 == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref), rel=1e-12)
    assert result.cosine == pytest.approx(_row_cosines(ref, got).min(), rel=1e-12)
    expected_top1 = np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1))
    assert expected_top1 == pytest.approx(5 / 6)
    assert result.top1 == pytest.approx(expected_top1)
    assert result.finite is True


def test_figures_pool_all_outputs(rng):
    refs = [rng.standard_normal((3, 4)), rng.standard_normal((3, 2, 2))]
    gots = [refs[0] + 0.01, refs[1] * 1.5]
    result = compare_outputs(refs, gots)
    diffs = [g - r for r, g in zip(refs, gots, strict=True)]
    diff_norm = np.sqrt(sum(np.sum(d * d) for d in diffs))
    ref_norm = np.sqrt(sum(np.sum(r * r) for r in refs))
    assert result.rel_l2 == pytest.approx(diff_norm / ref_norm, rel=1e-12)
    assert result.max_abs == pytest.approx(max(np.abs(d).max() for d in diffs), rel=1e-12)
    worst = min(_row_cosines(r, g).min() for r, g in zip(refs, gots, strict=True))
    assert result.cosine == pytest.approx(worst, rel=1e-12)


def test_nan_in_got_is_not_finite(rng):
    ref = rng.standard_normal((2, 5)).astype(np.float32)
    got = ref.copy()
    got[1, 3] = np.nan
    result = compare_outputs([ref], [got])
    assert result.finite is False
    assert result.max_abs == float("inf")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_infinity_in_got_is_not_finite(rng):
    ref = rng.standard_normal((2, 5)).astype(np.float32)
    got = ref.copy()
    got[0, 0] = np.inf
    assert compare_outputs([ref], [got]).finite is False


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_infinity_in_got_gives_an_infinite_max_abs(rng):
    ref = rng.standard_normal((2, 5))
    got = ref.copy()
    got[0, 0] = np.inf
    assert compare_outputs([ref], [got]).max_abs == float("inf")


def test_a_nan_row_does_not_report_a_perfect_cosine():
    ref = np.ones((2, 4))
    got = ref.copy()
    got[1] = np.nan
    result = compare_outputs([ref], [got])
    assert not result.cosine > 0.99


def test_nan_where_the_reference_has_nan_is_ignored(rng):
    ref = rng.standard_normal((2, 5))
    ref[0, 1] = np.nan
    got = ref.copy()
    got[0, 1] = np.nan
    got[1, 4] += 0.5
    valid = np.isfinite(ref)
    result = compare_outputs([ref], [got])
    assert result.finite is True
    diff = np.where(valid, got - ref, 0.0)
    expected = np.linalg.norm(diff) / np.linalg.norm(np.where(valid, ref, 0.0))
    assert result.rel_l2 == pytest.approx(expected, rel=1e-12)


def test_shape_mismatch_raises(rng):
    ref = rng.standard_normal((2, 5))
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([ref], [ref.reshape(5, 2)])


def test_count_mismatch_raises(rng):
    ref = rng.standard_normal((2, 5))
    with pytest.raises(ValueError, match="outputs"):
        compare_outputs([ref, ref], [ref])


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (3, 1)], ids=["1d", "3d", "one-class"])
def test_top1_is_none_without_a_batch_of_class_scores(rng, shape):
    ref = rng.standard_normal(shape)
    result = compare_outputs([ref], [ref + 0.1])
    assert result.top1 is None
    assert result.rel_l2 > 0


def test_as_dict_holds_every_figure(rng):
    ref = rng.standard_normal((2, 3))
    result = compare_outputs([ref], [ref * 2])
    assert result.as_dict() == {
        "max_abs": result.max_abs,
        "rel_l2": result.rel_l2,
        "cosine": result.cosine,
        "top1": result.top1,
        "finite": result.finite,
    }
    assert result.rel_l2 == pytest.approx(1.0)

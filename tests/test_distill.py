"""``onnxforge.distill``: the loss, the training loop, and accuracy recovery after pruning."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from test_cli import cli  # the CLI run as a user runs it (tests/ is on sys.path)

import onnxforge
from onnxforge import distill as distill_module
from onnxforge.backend import Session
from onnxforge.distill import (
    DISTILL_META_KEY,
    TrainingData,
    distill,
    distillation_loss,
    load_training_data,
    top1_accuracy,
)
from onnxforge.errors import InputError
from onnxforge.samples import get_sample
from onnxforge.samples.digits import PIXEL_SCALE, DigitsCNN, load_digits_split

PRUNING = "prune{granularity=channel,sparsity=0.5}"
# The bar: within one point of the float teacher's held-out top-1.
RECOVERY_BAR = 0.01


@pytest.fixture(scope="module")
def teacher_model() -> ir.Model:
    return onnxforge.export("digits-cnn")


@pytest.fixture(scope="module")
def pruned(teacher_model) -> ir.Model:
    """digits-cnn with half of every layer's channels removed, not retrained."""
    return onnxforge.optimize(teacher_model.clone(), PRUNING).model


@pytest.fixture(scope="module")
def small_data() -> TrainingData:
    inputs, labels = get_sample("digits-cnn").training_data()
    return TrainingData({"x": inputs["x"][:200]}, labels[:200])


def held_out(model: ir.Model) -> float:
    """Held-out top-1 of an ONNX model, measured here with ONNX Runtime."""
    inputs, labels = get_sample("digits-cnn").evaluation_data()
    return float(np.mean(Session(model).run(inputs)[0].argmax(axis=1) == labels))


# --- the loss -------------------------------------------------------------------------------


def test_loss_is_the_weighted_sum_of_softened_kl_and_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=generator)
    teacher = torch.randn(6, 10, generator=generator)
    labels = torch.randint(0, 10, (6,), generator=generator)
    t, alpha = 3.0, 0.25
    p = F.softmax(teacher / t, dim=1)
    kl = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum(dim=1).mean()
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    got = distillation_loss(student, teacher, labels, temperature=t, alpha=alpha)
    torch.testing.assert_close(got, expected)
    # Without labels only the distillation term remains; it vanishes when the two agree.
    torch.testing.assert_close(distillation_loss(student, teacher, None, temperature=t), t * t * kl)
    assert float(distillation_loss(teacher, teacher, None)) == pytest.approx(0.0, abs=1e-6)


# --- the training loop ----------------------------------------------------------------------


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_is_deterministic_for_a_seed(pruned, small_data):
    def run(seed: int) -> dict[str, torch.Tensor]:
        result = distill("digits-cnn", pruned, data=small_data, epochs=2, seed=seed, export=False)
        return _state(result.module)

    first, again, other = run(0), run(0), run(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_torch_threads_and_global_rng_are_restored(pruned, small_data):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill("digits-cnn", pruned, data=small_data, epochs=1, threads=1, export=False)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(torch.rand(3), expected)


def test_progress_is_reported_after_every_step(pruned, small_data):
    calls = []
    distill(
        "digits-cnn",
        pruned,
        data=small_data,
        epochs=3,
        batch_size=64,
        export=False,
        on_progress=lambda step, total, loss: calls.append((step, total, loss)),
    )
    steps = 3 * math.ceil(200 / 64)
    assert [c[0] for c in calls] == list(range(1, steps + 1))
    assert {c[1] for c in calls} == {steps}
    assert all(math.isfinite(c[2]) for c in calls)


def test_a_pytorch_student_from_scratch_learns_from_the_teacher():
    """The student can be a module: here a fresh, untrained half-width DigitsCNN."""
    torch.manual_seed(0)
    student = DigitsCNN((8, 16, 32))
    result = distill("digits-cnn", student, sample="digits-cnn", epochs=3, export=False)
    assert result.module is student
    assert result.accuracy_before < 0.3  # ten classes, random weights
    assert result.accuracy_after > result.accuracy_before + 0.5
    assert result.losses[-1] < result.losses[0]
    inputs, labels = get_sample("digits-cnn").evaluation_data()
    assert top1_accuracy(student, inputs, labels) == result.accuracy_after


def test_without_labels_the_student_follows_the_teacher(pruned, small_data):
    unlabelled = TrainingData(small_data.inputs)
    teacher = get_sample("digits-cnn").build()
    result = distill(teacher, pruned, data=unlabelled, epochs=4, export=False)
    inputs, _ = get_sample("digits-cnn").evaluation_data()
    with torch.no_grad():
        wanted = teacher(torch.from_numpy(inputs["x"])).argmax(dim=1).numpy()
    before = np.mean(Session(pruned).run(inputs)[0].argmax(axis=1) == wanted)
    # Agreement with the teacher's own predictions, which were the only target.
    after = top1_accuracy(result.module, inputs, wanted)
    assert after > before + 0.3
    assert result.teacher_accuracy is None  # no labelled evaluation data was given


def test_mismatched_data_and_models_are_clear_errors(pruned, small_data):
    with pytest.raises(InputError, match="disagree on the number of examples"):
        TrainingData({"x": small_data.inputs["x"]}, small_data.labels[:10])
    with pytest.raises(InputError, match="needs training data"):
        distill("digits-cnn", pruned)
    with pytest.raises(InputError, match="has no training data"):
        distill("seed-cnn", "seed-cnn", sample="seed-cnn")
    with pytest.raises(InputError, match="alpha must be in"):
        distill("digits-cnn", pruned, data=small_data, alpha=1.5)
    flat = TrainingData({"x": small_data.inputs["x"].reshape(-1, 64)}, small_data.labels)
    with pytest.raises(InputError, match="the teacher cannot run on the data"):
        distill("digits-cnn", "mlp", data=flat)


@pytest.mark.parametrize("name", ["digits-cnn", "mlp"])
def test_digits_training_data_is_the_training_split(name):
    split = load_digits_split()
    inputs, labels = get_sample(name).training_data()
    (x,) = inputs.values()
    np.testing.assert_array_equal(labels, split["y_train"])
    pixels = np.round(x.reshape(len(x), -1) * PIXEL_SCALE).astype(np.uint8)
    np.testing.assert_array_equal(pixels, split["x_train"])
    held_out = {row.tobytes() for row in split["x_test"]}
    assert not any(row.tobytes() in held_out for row in pixels)


def test_training_data_from_an_npz(tmp_path, small_data):
    path = tmp_path / "train.npz"
    np.savez(path, x=small_data.inputs["x"], labels=small_data.labels)
    loaded = load_training_data(path)
    assert list(loaded.inputs) == ["x"]
    np.testing.assert_array_equal(loaded.labels, small_data.labels)
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable .npz"):
        load_training_data(tmp_path / "objects.npz")


# --- the bar: accuracy recovery after pruning -----------------------------------------------


@pytest.mark.slow
def test_distillation_recovers_pruned_digits_cnn_to_within_one_point(teacher_model, pruned):
    teacher_accuracy = held_out(teacher_model)
    pruned_accuracy = held_out(pruned)
    assert pruned_accuracy < teacher_accuracy - 0.3  # pruning without retraining hurts

    result = distill("digits-cnn", pruned, sample="digits-cnn")  # the defaults, seed 0

    assert result.teacher_accuracy == pytest.approx(teacher_accuracy)
    assert result.accuracy_before == pytest.approx(pruned_accuracy)
    student_accuracy = held_out(result.model)  # the exported student, not the module
    assert student_accuracy == pytest.approx(result.accuracy_after)
    assert student_accuracy >= teacher_accuracy - RECOVERY_BAR
    # Still the pruned architecture: the same parameter shapes as the pruned graph.
    shapes = {n: tuple(v.shape) for n, v in result.model.graph.initializers.items()}
    for name, value in pruned.graph.initializers.items():
        if value.const_value.dtype.is_floating_point() and len(value.shape) >= 1:
            assert shapes[name] == tuple(value.shape), name
    settings = json.loads(result.model.metadata_props[DISTILL_META_KEY])
    assert settings["student_pipeline"] == pruned.metadata_props["onnxforge.pipeline"]
    assert settings["student_pipeline"].startswith("prune{granularity=channel")
    assert settings["epochs"] == distill_module.DEFAULT_EPOCHS
    assert settings["examples"] == len(get_sample("digits-cnn").training_data()[1])


# --- the command line -----------------------------------------------------------------------


def test_cli_help_states_the_library_defaults(tmp_path):
    result = cli("distill", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for option, value in [
        ("epochs", distill_module.DEFAULT_EPOCHS),
        ("temperature", f"{distill_module.DEFAULT_TEMPERATURE:g}"),
        ("alpha", distill_module.DEFAULT_ALPHA),
        ("learning rate", f"{distill_module.DEFAULT_LEARNING_RATE:g}"),
        ("batch", distill_module.DEFAULT_BATCH_SIZE),
        ("seed", distill_module.DEFAULT_SEED),
        ("threads", distill_module.DEFAULT_THREADS),
    ]:
        assert f"(default: {value})" in text, option


@pytest.mark.slow
def test_cli_distills_a_pruned_onnx_model(tmp_path, pruned):
    onnxforge.save(pruned, tmp_path / "pruned.onnx")
    result = cli("distill", "pruned.onnx", "-o", "student.onnx", "--teacher", "digits-cnn",
                  "--epochs", "3", "--json", "student.json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "student after (ONNX Runtime)" in result.stdout
    assert "wrote student.onnx" in result.stdout
    figures = json.loads((tmp_path / "student.json").read_text())
    assert figures["settings"]["epochs"] == 3 and len(figures["losses"]) == 3
    assert figures["settings"]["sample"] == "digits-cnn"  # taken from the teacher's name
    student = onnxforge.load(tmp_path / "student.onnx")
    assert held_out(student) == pytest.approx(figures["accuracy_after"])
    assert figures["accuracy_after"] > figures["accuracy_before"]


def test_cli_without_a_teacher_is_one_error_line(tmp_path, pruned):
    onnxforge.save(pruned, tmp_path / "pruned.onnx")
    result = cli("distill", "pruned.onnx", "-o", "student.onnx", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: no teacher (hint:")
    assert not (tmp_path / "student.onnx").exists()


@pytest.mark.slow
def test_cli_trains_on_given_arrays_with_an_onnx_teacher(tmp_path, teacher_model, pruned):
    onnxforge.save(teacher_model, tmp_path / "teacher.onnx")
    onnxforge.save(pruned, tmp_path / "pruned.onnx")
    inputs, labels = get_sample("digits-cnn").training_data()
    np.savez(tmp_path / "train.npz", x=inputs["x"][:128], labels=labels[:128])
    arguments = ["pruned.onnx", "-o", "student.onnx", "--teacher", "teacher.onnx"]
    arguments += ["--data", "train.npz", "--epochs", "2", "--json", "s.json"]
    result = cli("distill", *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy not measured" in result.stdout
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["settings"]["examples"] == 128 and figures["settings"]["sample"] is None
    assert figures["accuracy_after"] is None
    assert len(figures["losses"]) == 2
    assert onnxforge.load(tmp_path / "student.onnx").graph.inputs[0].name == "x"

"""The bundled samples: export, dynamic axes, real weights and data, determinism."""

from __future__ import annotations

import collections.abc
import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.samples import (
    Sample,
    available_samples,
    digits,
    get_sample,
    minilm,
    resnet,
    seed_cnn,
    transformer,
)
from onnxforge.samples.train_digits import make_split, train

# Samples whose export alone takes more than 5 s on a CPU.
SLOW_SAMPLES = {"minilm"}
# A sequence length other than every sample's example one (transformer 32, minilm 128).
OTHER_SEQUENCE = 16


def sample_params(names) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SAMPLES else n for n in names]


@dataclasses.dataclass
class Exported:
    """A sample, its PyTorch module and its exported model with an ONNX Runtime session."""

    sample: Sample
    module: torch.nn.Module
    model: ir.Model
    session: Session

    def run(self, *inputs: torch.Tensor) -> list[np.ndarray]:
        names = [v.name for v in self.model.graph.inputs]
        return self.session.run({n: t.numpy() for n, t in zip(names, inputs, strict=True)})

    def reference(self, *inputs: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.module(*inputs).numpy()]


@pytest.fixture(scope="module")
def exported(request):
    """``exported(name)``: one export per sample for the whole module (seed-cnn: the session's)."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            sample = get_sample(name)
            if name == "seed-cnn":
                model = request.getfixturevalue("seed_cnn_model")
            else:
                model = onnxforge.export(name)
            cache[name] = Exported(sample, sample.build(), model, Session(model))
        return cache[name]

    return get


# --- every sample ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sample_params(available_samples()))
def test_sample_export_matches_pytorch(exported, name):
    e = exported(name)
    inputs = e.sample.example_inputs(2)
    comparison = compare_outputs(e.reference(*inputs), e.run(*inputs))
    assert comparison.finite
    assert comparison.rel_l2 <= e.sample.export_tolerance


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", sample_params(available_samples()))
def test_sample_runs_at_another_batch(exported, name, batch):
    e = exported(name)
    assert all(isinstance(v.shape[0], ir.SymbolicDim) for v in e.model.graph.inputs)
    inputs = e.sample.example_inputs(batch)
    got = e.run(*inputs)
    assert got[0].shape[0] == batch
    comparison = compare_outputs(e.reference(*inputs), got)
    assert comparison.finite
    assert comparison.rel_l2 <= e.sample.export_tolerance


@pytest.mark.parametrize(
    "name", sample_params(n for n, s in available_samples().items() if s.calibration_data)
)
def test_sample_data_is_keyed_by_the_model_inputs(exported, name):
    e = exported(name)
    input_names = {v.name for v in e.model.graph.inputs}
    first = next(iter(e.sample.calibration_data()))
    assert set(first) == input_names
    evaluation, _ = e.sample.evaluation_data()
    assert set(evaluation) == input_names
    (out,) = e.session.run(first)
    assert out.shape[0] == len(next(iter(first.values())))


# --- symbolic sequence axis ------------------------------------------------------------------


def other_sequence_inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    if name == "transformer":
        return transformer.example_inputs(batch, sequence=OTHER_SEQUENCE)
    encoded = minilm.tokenize(minilm.sentences()[:batch], sequence=OTHER_SEQUENCE)
    return torch.from_numpy(encoded["input_ids"]), torch.from_numpy(encoded["attention_mask"])


@pytest.mark.parametrize("name", sample_params(["transformer", "minilm"]))
def test_sequence_axis_is_symbolic(exported, name):
    e = exported(name)
    for value in e.model.graph.inputs:
        assert isinstance(value.shape[1], ir.SymbolicDim)
    exported_sequence = e.sample.example_inputs(2)[0].shape[1]
    assert exported_sequence != OTHER_SEQUENCE
    inputs = other_sequence_inputs(name, 3)
    assert inputs[0].shape == (3, OTHER_SEQUENCE)
    got = e.run(*inputs)
    comparison = compare_outputs(e.reference(*inputs), got)
    assert comparison.rel_l2 <= e.sample.export_tolerance


# --- digits-cnn and mlp: real weights, real data ----------------------------------------------


@pytest.mark.parametrize(("name", "least_accuracy"), [("digits-cnn", 0.97), ("mlp", 0.95)])
def test_digits_held_out_accuracy(exported, name, least_accuracy):
    e = exported(name)
    inputs, labels = e.sample.evaluation_data()
    onnx_logits = e.session.run(inputs)[0]
    with torch.no_grad():
        torch_logits = e.module(torch.from_numpy(inputs["x"])).numpy()
    onnx_accuracy = float(np.mean(onnx_logits.argmax(1) == labels))
    torch_accuracy = float(np.mean(torch_logits.argmax(1) == labels))
    assert len(labels) == len(digits.load_digits_split()["y_test"])
    assert onnx_accuracy >= least_accuracy
    assert onnx_accuracy == torch_accuracy


@pytest.mark.parametrize("name", ["digits-cnn", "mlp"])
def test_digits_calibration_is_streamed_training_data(name):
    split = digits.load_digits_split()
    batches = get_sample(name).calibration_data()
    assert isinstance(batches, collections.abc.Generator)
    images = []
    for batch in batches:
        (x,) = batch.values()
        assert x.dtype == np.float32
        assert len(x) <= digits.CALIBRATION_BATCH
        images.append(x.reshape(len(x), -1))
    pixels = np.round(np.concatenate(images) * digits.PIXEL_SCALE).astype(np.uint8)
    np.testing.assert_array_equal(pixels, split["x_train"])
    held_out = {row.tobytes() for row in split["x_test"]}
    assert not any(row.tobytes() in held_out for row in pixels)


def test_digits_evaluation_data_is_the_held_out_split():
    split = digits.load_digits_split()
    inputs, labels = get_sample("mlp").evaluation_data()
    np.testing.assert_array_equal(labels, split["y_test"])
    np.testing.assert_array_equal(
        np.round(inputs["x"] * digits.PIXEL_SCALE).astype(np.uint8), split["x_test"]
    )


def test_make_split_reproduces_the_shipped_data():
    with np.load(digits.DIGITS_FILE, allow_pickle=False) as data:
        shipped = {name: data[name] for name in data.files}
    regenerated = make_split()
    assert set(regenerated) == set(shipped)
    for name, array in shipped.items():
        assert regenerated[name].dtype == array.dtype, name
        np.testing.assert_array_equal(regenerated[name], array, err_msg=name)


def test_short_training_learns():
    accuracy = train(digits.DigitsMLP(), make_split(), flat=True, epochs=2)
    assert isinstance(accuracy, float)
    assert 0.5 < accuracy <= 1.0


# --- minilm: the real pretrained encoder --------------------------------------------------------

PARAPHRASES = (
    "A man is playing a guitar on stage.",
    "Someone performs a song with an acoustic guitar in front of an audience.",
)
UNRELATED = "The central bank raised interest rates to fight inflation."
# Pretrained all-MiniLM-L6-v2 separates these by ~0.6 in cosine; random BERT weights put all
# three within ~0.01 of each other.
SIMILARITY_MARGIN = 0.3


@pytest.mark.slow
def test_minilm_embeddings_are_unit_length(exported):
    e = exported("minilm")
    inputs, labels = e.sample.evaluation_data()
    assert labels is None
    (embeddings,) = e.session.run(inputs)
    assert embeddings.shape == (len(inputs["input_ids"]), 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_paraphrases_are_closer_than_unrelated_sentences(exported):
    e = exported("minilm")
    (embeddings,) = e.session.run(minilm.tokenize([*PARAPHRASES, UNRELATED]))
    similarity = embeddings @ embeddings.T
    paraphrase = similarity[0, 1]
    unrelated = max(similarity[0, 2], similarity[1, 2])
    assert paraphrase > unrelated + SIMILARITY_MARGIN


def test_minilm_data_comes_from_disjoint_halves():
    sentences = minilm.sentences()
    half = len(sentences) // 2
    calibration, evaluation = sentences[:half], sentences[half:]
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    sample = get_sample("minilm")
    batches = sample.calibration_data()
    assert isinstance(batches, collections.abc.Generator)
    batches = list(batches)
    expected = minilm.tokenize(calibration)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.concatenate([b[name] for b in batches]), array)
    inputs, _ = sample.evaluation_data()
    for name, array in minilm.tokenize(evaluation).items():
        np.testing.assert_array_equal(inputs[name], array)


# --- seeded samples are deterministic -------------------------------------------------------------


@pytest.mark.parametrize("build", [seed_cnn.build, resnet.build], ids=["seed-cnn", "resnet"])
def test_seeded_sample_builds_are_identical(build):
    first = build().state_dict()
    # Disturb the global generator: the weights must not depend on it.
    torch.manual_seed(12345)
    torch.rand(100)
    second = build().state_dict()
    assert list(first) == list(second)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name

"""``digits-cnn`` and ``mlp``: small networks trained on the UCI handwritten digits (8x8).

The data is scikit-learn's bundled copy of the UCI digits set (1,797 images, 16 grey levels),
shipped here as ``data/digits.npz`` with a fixed stratified split (1,437 train / 360 held out).
The trained weights ship as ``data/digits_cnn.npz`` and ``data/digits_mlp.npz`` (plain arrays,
no pickle). ``python -m onnxforge.samples.train_digits`` regenerates all three files.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from onnxforge.samples.catalog import Sample, register_sample

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "DATA_DIR",
    "load_digits_split",
    "load_weights",
    "build_cnn",
    "build_mlp",
    "CALIBRATION_BATCH",
    "PIXEL_SCALE",
]

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DIGITS_FILE = DATA_DIR / "digits.npz"
CNN_WEIGHTS = DATA_DIR / "digits_cnn.npz"
MLP_WEIGHTS = DATA_DIR / "digits_mlp.npz"
# Pixels are 0..16 grey levels; inputs are scaled to 0..1.
PIXEL_SCALE = 16.0
CALIBRATION_BATCH = 32


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU stages (1->16->32->64 channels) and a linear classifier on 1x8x8."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 1x8x8 images scaled to 0..1."""
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """A 64-128-64-10 perceptron on the flattened 8x8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 64-pixel rows scaled to 0..1."""
        return self.layers(x)


@functools.cache
def load_digits_split() -> dict[str, np.ndarray]:
    """The shipped split: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 pixels 0..16)."""
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def load_weights(module: nn.Module, path: pathlib.Path) -> nn.Module:
    """Load a state dict stored as plain arrays in an ``.npz`` (no pickle involved)."""
    with np.load(path, allow_pickle=False) as data:
        state = {name: torch.from_numpy(data[name]) for name in data.files}
    module.load_state_dict(state)
    return module.eval()


def _images(pixels: np.ndarray, *, flat: bool) -> np.ndarray:
    scaled = (pixels.astype(np.float32) / PIXEL_SCALE).reshape(-1, 64)
    return scaled if flat else scaled.reshape(-1, 1, 8, 8)


def build_cnn() -> nn.Module:
    """``digits-cnn`` with its trained weights, in eval mode."""
    return load_weights(DigitsCNN(), CNN_WEIGHTS)


def build_mlp() -> nn.Module:
    """``mlp`` with its trained weights, in eval mode."""
    return load_weights(DigitsMLP(), MLP_WEIGHTS)


def _example_inputs(batch: int, *, flat: bool) -> tuple[torch.Tensor, ...]:
    pixels = load_digits_split()["x_test"]
    rows = np.resize(np.arange(len(pixels)), batch)  # the first held-out images, wrapping
    return (torch.from_numpy(_images(pixels[rows], flat=flat)),)


def _calibration_data(*, flat: bool, input_name: str = "x") -> Iterator[dict[str, np.ndarray]]:
    """Training images in batches of CALIBRATION_BATCH (never the held-out set)."""
    pixels = load_digits_split()["x_train"]
    for start in range(0, len(pixels), CALIBRATION_BATCH):
        yield {input_name: _images(pixels[start : start + CALIBRATION_BATCH], flat=flat)}


def _training_data(
    *, flat: bool, input_name: str = "x"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The training images and their labels (what the shipped weights were trained on)."""
    split = load_digits_split()
    return {input_name: _images(split["x_train"], flat=flat)}, split["y_train"].astype(np.int64)


def _evaluation_data(
    *, flat: bool, input_name: str = "x"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The held-out images and their labels."""
    split = load_digits_split()
    return {input_name: _images(split["x_test"], flat=flat)}, split["y_test"].astype(np.int64)


register_sample(
    Sample(
        "digits-cnn",
        "CNN trained on the UCI handwritten digits (1x8x8), real weights and held-out data",
        build_cnn,
        functools.partial(_example_inputs, flat=False),
        calibration_data=functools.partial(_calibration_data, flat=False),
        evaluation_data=functools.partial(_evaluation_data, flat=False),
        metric="top1",
        training_data=functools.partial(_training_data, flat=False),
    )
)
register_sample(
    Sample(
        "mlp",
        "64-128-64-10 perceptron trained on the UCI digits (flattened 8x8)",
        build_mlp,
        functools.partial(_example_inputs, flat=True),
        calibration_data=functools.partial(_calibration_data, flat=True),
        evaluation_data=functools.partial(_evaluation_data, flat=True),
        metric="top1",
        training_data=functools.partial(_training_data, flat=True),
    )
)

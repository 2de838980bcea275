"""Regenerate ``data/digits.npz`` and the trained ``digits-cnn`` and ``mlp`` weights.

    python -m onnxforge.samples.train_digits [--epochs N]

Needs scikit-learn (the ``dev`` extra), whose package bundles the UCI digits; nothing is
downloaded. Training is seeded and takes a few seconds on a CPU; it prints held-out accuracy.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import nn

from onnxforge.samples.digits import (
    CNN_WEIGHTS,
    DIGITS_FILE,
    MLP_WEIGHTS,
    DigitsCNN,
    DigitsMLP,
    _images,
)

SEED = 0
TEST_FRACTION = 0.2
DEFAULT_EPOCHS = 40
BATCH = 64
LEARNING_RATE = 3e-3


def make_split() -> dict[str, np.ndarray]:
    """A stratified, seeded split of scikit-learn's digits, pixels as uint8 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.uint8)
    y = digits.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def train(module: nn.Module, split: dict[str, np.ndarray], *, flat: bool, epochs: int) -> float:
    """Train with Adam and cross-entropy; returns held-out accuracy."""
    torch.manual_seed(SEED)
    x = torch.from_numpy(_images(split["x_train"], flat=flat))
    y = torch.from_numpy(split["y_train"].astype(np.int64))
    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        module.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), BATCH):
            index = order[start : start + BATCH]
            optimizer.zero_grad()
            loss_fn(module(x[index]), y[index]).backward()
            optimizer.step()
        schedule.step()
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(_images(split["x_test"], flat=flat)))
    return float((logits.argmax(1).numpy() == split["y_test"]).mean())


def _save_state(module: nn.Module, path) -> None:
    state = {name: t.detach().numpy() for name, t in module.state_dict().items()}
    np.savez_compressed(path, **state)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the data and weights; print held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    split = make_split()
    np.savez_compressed(DIGITS_FILE, **split)
    for name, module, flat, path in (
        ("digits-cnn", DigitsCNN(), False, CNN_WEIGHTS),
        ("mlp", DigitsMLP(), True, MLP_WEIGHTS),
    ):
        accuracy = train(module, split, flat=flat, epochs=args.epochs)
        _save_state(module, path)
        sys.stdout.write(f"{name}: held-out accuracy {accuracy:.4f} -> {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

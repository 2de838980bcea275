"""``resnet``: a ResNet-18-style network in plain torch (torchvision has no CPU build here).

ImageNet layout (7x7 stem, max-pool, four stages of two basic blocks, 64-128-256-512
channels, global average pool, 1000 classes), on 3x64x64 inputs by default to keep CPU runs
short. Weights are drawn from a fixed seed with non-trivial BatchNorm statistics: this sample
is for speed, fusion and pruning work, not accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from onnxforge.samples.catalog import Sample, register_sample

__all__ = [
    "BasicBlock",
    "ResNet18",
    "build",
    "example_inputs",
    "calibration_data",
    "evaluation_data",
    "IMAGE_SIZE",
    "SEED",
]

SEED = 0
IMAGE_SIZE = 64
# Seeded random images stand in for data (the weights are random too): calibration batches
# and a held-out evaluation set drawn from other seeds.
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH = 8
EVALUATION_ROWS = 32
STAGE_WIDTHS = (64, 128, 256, 512)
NUM_CLASSES = 1000


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (a 1x1 projection when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18: stem, four stages of two BasicBlocks, pooling, classifier."""

    def __init__(self, widths: tuple[int, ...] = STAGE_WIDTHS, classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            blocks += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
            channels = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 3xHxW images."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build() -> nn.Module:
    """ResNet-18 with seeded He-initialised weights and randomised BatchNorm statistics."""
    with torch.random.fork_rng():  # seed the layers' own init without touching the caller's RNG
        torch.manual_seed(SEED)
        model = ResNet18()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    """One seeded batch of 3x64x64 images."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return (torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),)


def _images(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def calibration_data() -> Iterator[dict[str, np.ndarray]]:
    """Seeded random images in CALIBRATION_BATCHES batches, for quantization."""
    for index in range(CALIBRATION_BATCHES):
        yield {"x": _images(CALIBRATION_BATCH, SEED + 100 + index)}


def evaluation_data() -> tuple[dict[str, np.ndarray], None]:
    """Other seeded random images; no labels (the metric compares with the float model)."""
    return {"x": _images(EVALUATION_ROWS, SEED + 200)}, None


register_sample(
    Sample(
        "resnet",
        "ResNet-18-style CNN in plain torch (3x64x64, 1000 classes), seeded weights",
        build,
        example_inputs,
        calibration_data=calibration_data,
        evaluation_data=evaluation_data,
    )
)

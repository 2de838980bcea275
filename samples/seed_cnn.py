"""``seed-cnn``: the classic CIFAR-10-shaped network (conv 3->6->16, fc 120-84-10) on 3x32x32.

Weights are drawn from a fixed seed, so every export of this sample is the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from onnxforge.samples.catalog import Sample, register_sample

__all__ = ["SeedCNN", "build", "example_inputs", "SEED"]

SEED = 0


class SeedCNN(nn.Module):
    """Conv-BN-ReLU-pool twice, then three fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 3x32x32 images."""
        return self.classifier(self.features(x))


def build() -> nn.Module:
    """The network with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    generator = torch.Generator().manual_seed(SEED)
    model = SeedCNN()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    """One seeded batch of images."""
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED + 1)),)


register_sample(
    Sample(
        "seed-cnn",
        "CIFAR-10-shaped CNN (conv 3-6-16, fc 120-84-10), seeded weights",
        build,
        example_inputs,
    )
)

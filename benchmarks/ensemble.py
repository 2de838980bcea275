"""Ensemble as one graph vs its members run one after the other: latency and accuracy.

The two members are digits-cnn variants: the float model, and the model pruned to half its
channels and retrained by distillation (``onnxforge.distill`` defaults, seed 0). The
ensemble (``onnxforge.ensemble``, ``mean`` of the logits) is one ONNX Runtime session; the
baseline runs the two members' sessions one after the other and averages their outputs with
numpy, which is what the ensemble computes (checked before timing). Both sides are timed as
exported and after ``fold-constants,cleanup,fuse`` (the ensemble optimised as one model, the
members each on their own), on the CPU at batch 1, 8 and 64, with ``Session.run`` (the outputs
come back to the host on both sides). Each repeat times the two sides back to back, in
alternating order, so that they share the machine's noise; the table gives the median over
repeats of each side's p50 latency and their ratio. Held-out top-1 accuracy of each member and
of the ensemble (mean and vote) closes the report.

    python benchmarks/ensemble.py [--repeats 7] [--runs 200] [--threads N] [--json PATH]

The bar: the ensemble session has a lower p50 latency than the two members in sequence, at
every batch size, exported and optimised.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import numpy as np

import onnxforge
from onnxforge.backend import Session, make_inputs
from onnxforge.backend.benchmark import time_runs
from onnxforge.distill import distill
from onnxforge.ensemble import ensemble
from onnxforge.samples import get_sample

SAMPLE = "digits-cnn"
PRUNING = "prune{granularity=channel,sparsity=0.5}"
OPTIMIZE = "fold-constants,cleanup,fuse"
BATCHES = (1, 8, 64)


def accuracy(model) -> float:
    inputs, labels = get_sample(SAMPLE).evaluation_data()
    return float(np.mean(Session(model).run(inputs)[0].argmax(axis=1) == labels))


def members() -> dict[str, object]:
    float_model = onnxforge.export(SAMPLE)
    pruned = onnxforge.optimize(float_model.clone(), PRUNING).model
    student = distill(SAMPLE, pruned, sample=SAMPLE).model
    return {"float": float_model, "distilled half-width": student}


def time_pair(parts: list, merged, batch: int, *, repeats: int, runs: int, threads):
    """Median over repeats of the p50 (ms) of the members in sequence and of the ensemble."""
    sessions = [Session(m, threads=threads) for m in parts]
    one = Session(merged, threads=threads)
    feed = make_inputs(merged, batch=batch)

    def sequence():
        outputs = [s.run(feed)[0] for s in sessions]
        return np.mean(outputs, axis=0)

    np.testing.assert_allclose(one.run(feed)[0], sequence(), rtol=1e-4, atol=1e-4)
    p50s = {"sequence": [], "ensemble": []}
    for repeat in range(repeats):
        order = [("sequence", sequence), ("ensemble", lambda: one.run(feed))]
        for label, call in order if repeat % 2 == 0 else reversed(order):
            p50s[label].append(time_runs(call, batch=batch, runs=runs).p50_ms)
    return {label: statistics.median(values) for label, values in p50s.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per repeat")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write rows here")
    args = parser.parse_args()

    variants = members()
    parts = list(variants.values())
    forms = {
        "exported": (parts, ensemble(parts, mode="mean")),
        "optimised": (
            [onnxforge.optimize(m.clone(), OPTIMIZE).model for m in parts],
            onnxforge.optimize(ensemble(parts, mode="mean"), OPTIMIZE).model,
        ),
    }
    rows = []
    for form, (members_form, merged) in forms.items():
        for batch in BATCHES:
            p50 = time_pair(
                members_form,
                merged,
                batch,
                repeats=args.repeats,
                runs=args.runs,
                threads=args.threads,
            )
            rows.append(
                {
                    "form": form,
                    "batch": batch,
                    "sequence_p50_ms": p50["sequence"],
                    "ensemble_p50_ms": p50["ensemble"],
                    "ratio": p50["sequence"] / p50["ensemble"],
                    "nodes": merged.graph.num_nodes(),
                }
            )

    print(
        f"ensemble (mean) of {' + '.join(variants)} {SAMPLE} as one ONNX Runtime CPU session "
        f"vs the two sessions in sequence + numpy mean; medians of {args.repeats} repeats x "
        f"{args.runs} runs, {args.threads or 'default'} intra-op threads"
    )
    header = (
        f"{'form':<10} {'nodes':>5} {'batch':>5} {'sequence p50 ms':>15} "
        f"{'ensemble p50 ms':>15} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['form']:<10} {row['nodes']:>5} {row['batch']:>5} "
            f"{row['sequence_p50_ms']:>15.3f} {row['ensemble_p50_ms']:>15.3f} "
            f"{row['ratio']:>5.2f}x"
        )
    print()
    figures = {name: accuracy(model) for name, model in variants.items()}
    for mode in ("mean", "vote"):
        figures[f"ensemble ({mode})"] = accuracy(ensemble(parts, mode=mode))
    print("held-out top-1: " + ", ".join(f"{name} {value:.4f}" for name, value in figures.items()))
    passed = all(row["ratio"] > 1.0 for row in rows)
    verdict = "meets" if passed else "MISSES"
    print(f"bar: one ensemble session faster than the members in sequence everywhere: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "accuracy": figures}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

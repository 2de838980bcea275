"""Channel pruning benchmark: parameters, MACs, CPU latency and accuracy, before and after.

For ``resnet`` and ``digits-cnn``: export, prune half the channels of every prunable layer
(``prune{granularity=channel,sparsity=0.5}``, verified with the ONNX checker), then time the
unpruned and the pruned model with ONNX Runtime on the CPU at batch 1 and batch 8. Each
repeat times both models back to back (so that they share the machine's noise), and the
table gives the median over repeats of each run's p50 latency, and their ratio. digits-cnn's
held-out top-1 accuracy is measured before and after: nothing is retrained, so it drops.

    python benchmarks/pruning.py [--repeats 7] [--runs 200] [--threads N] [--json PATH]

The bar: at least 1.3x lower latency than the unpruned model, on both samples.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import onnxforge
from onnxforge.backend import Session, benchmark, make_inputs
from onnxforge.passes.pipeline import format_pass
from onnxforge.passes.prune import PrunePass
from onnxforge.samples import get_sample

SAMPLES = ("resnet", "digits-cnn")
BATCHES = (1, 8)
SPARSITY = 0.5
BAR = 1.3


def accuracy(model, name: str) -> float | None:
    sample = get_sample(name)
    if sample.evaluation_data is None or sample.metric != "top1":
        return None
    inputs, labels = sample.evaluation_data()
    logits = Session(model).run(inputs)[0]
    return float((logits.argmax(axis=1) == labels).mean())


def latencies(models: dict, batch: int, *, repeats: int, runs: int, threads: int | None):
    """Median over repeats of each model's p50 latency (ms), the models timed in turn."""
    sessions = {label: Session(model, threads=threads) for label, model in models.items()}
    inputs = make_inputs(next(iter(models.values())), batch=batch)
    p50s: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, session in sessions.items():
            p50s[label].append(benchmark(session, inputs, runs=runs).p50_ms)
    return {label: statistics.median(values) for label, values in p50s.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per repeat")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write rows here")
    args = parser.parse_args()

    rows = []
    for name in SAMPLES:
        model = onnxforge.export(name)
        pass_ = PrunePass(granularity="channel", sparsity=SPARSITY)
        pruned = onnxforge.optimize(model.clone(), [pass_], verify="structure").model
        report = pass_.report
        row = {
            "model": name,
            "pipeline": format_pass(pass_),
            "params": (report.parameters_before, report.parameters_after),
            "macs": (report.macs_before, report.macs_after),
            "accuracy": (accuracy(model, name), accuracy(pruned, name)),
            "left_alone": [
                f"{', '.join(s.layers)}: {'; '.join(s.reasons)}" for s in report.skipped
            ],
        }
        for batch in BATCHES:
            p50 = latencies(
                {"before": model, "after": pruned},
                batch,
                repeats=args.repeats,
                runs=args.runs,
                threads=args.threads,
            )
            row[f"p50_ms_b{batch}"] = (p50["before"], p50["after"])
            row[f"ratio_b{batch}"] = p50["before"] / p50["after"]
        rows.append(row)

    header = (
        f"{'model':<11} {'params before':>13} {'after':>10} {'MACs before':>12} {'after':>11} "
        f"{'batch':>5} {'p50 ms before':>13} {'after':>8} {'ratio':>6} {'top-1 before':>12} "
        f"{'after':>6}"
    )
    print(
        f"prune{{granularity=channel,sparsity={SPARSITY}}}, ONNX Runtime CPU, "
        f"medians of {args.repeats} repeats x {args.runs} runs, "
        f"{args.threads or 'default'} intra-op threads; MACs per sample"
    )
    print(header)
    print("-" * len(header))
    passed = True
    for row in rows:
        base_acc, pruned_acc = row["accuracy"]
        for batch in BATCHES:
            before, after = row[f"p50_ms_b{batch}"]
            ratio = row[f"ratio_b{batch}"]
            passed = passed and ratio >= BAR
            acc = (
                f"{base_acc:>12.4f} {pruned_acc:>6.4f}"
                if base_acc is not None and pruned_acc is not None
                else f"{'-':>12} {'-':>6}"
            )
            print(
                f"{row['model']:<11} {row['params'][0]:>13,} {row['params'][1]:>10,} "
                f"{row['macs'][0]:>12,} {row['macs'][1]:>11,} {batch:>5} {before:>13.3f} "
                f"{after:>8.3f} {ratio:>5.2f}x {acc}"
            )
    print()
    for row in rows:
        for line in row["left_alone"]:
            print(f"{row['model']}: left alone: {line}")
        base_acc, pruned_acc = row["accuracy"]
        if base_acc is not None and pruned_acc is not None:
            print(
                f"{row['model']}: held-out top-1 {base_acc:.4f} -> {pruned_acc:.4f} "
                f"({pruned_acc - base_acc:+.4f}) without retraining"
            )
    verdict = "meets" if passed else "MISSES"
    print(f"bar: >= {BAR}x lower p50 latency on every model and batch: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=float))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy recovery by distillation: digits-cnn pruned to half its channels, then retrained.

Export digits-cnn (the float teacher), prune half the channels of every layer
(``prune{granularity=channel,sparsity=0.5}``, no retraining), then retrain the pruned graph
(converted back to a torch module) with ``onnxforge.distill`` at its default settings, once
per seed. The same loop with ``alpha=0`` (cross-entropy on the labels only, no teacher) is the
plain fine-tuning baseline. Every accuracy is held-out top-1 of the exported ONNX model under
ONNX Runtime; the table gives each seed's figure, their median and minimum, and the median's
distance to the teacher.

    python benchmarks/distill.py [--seeds 5] [--epochs N] [--json PATH]
    python benchmarks/distill.py --sweep   # how the defaults were chosen (no held-out data)

``--sweep`` repeats the choice of defaults: candidate settings are trained on 80% of digits'
training split and scored on the other 20% (a validation split, seeded), over four seeds;
the held-out split is never looked at.

The bar: the median over seeds of the distilled student's held-out top-1 within 1 point of the
float teacher's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import numpy as np

import onnxforge
from onnxforge.backend import Session
from onnxforge.distill import DEFAULT_EPOCHS, TrainingData, distill
from onnxforge.passes.statistics import model_stats
from onnxforge.samples import get_sample

SAMPLE = "digits-cnn"
PRUNING = "prune{granularity=channel,sparsity=0.5}"
BAR = 0.01
VALIDATION_FRACTION = 0.2
SWEEP_SEEDS = 4
# (epochs, learning rate, temperature, alpha) tried by --sweep; alpha=0 is plain fine-tuning.
CANDIDATES = [
    (30, 1e-2, 4.0, 0.9),
    (30, 1e-2, 4.0, 0.7),
    (40, 3e-3, 4.0, 0.9),
    (30, 1e-2, 8.0, 0.9),
    (40, 3e-3, 8.0, 0.9),
    (30, 1e-2, 4.0, 0.0),
    (40, 3e-3, 4.0, 0.0),
]


def held_out(model) -> float:
    inputs, labels = get_sample(SAMPLE).evaluation_data()
    return float(np.mean(Session(model).run(inputs)[0].argmax(axis=1) == labels))


def sweep(pruned) -> int:
    inputs, labels = get_sample(SAMPLE).training_data()
    order = np.random.default_rng(1).permutation(len(labels))
    cut = int(len(labels) * (1 - VALIDATION_FRACTION))
    train = TrainingData({"x": inputs["x"][order[:cut]]}, labels[order[:cut]])
    valid = TrainingData({"x": inputs["x"][order[cut:]]}, labels[order[cut:]])
    print(
        f"validation sweep: {len(train)} training / {len(valid)} validation images from "
        f"digits' training split, {SWEEP_SEEDS} seeds each"
    )
    header = f"{'epochs':>6} {'lr':>7} {'T':>4} {'alpha':>5}  {'per seed':<32} {'mean':>6}"
    print(header)
    print("-" * len(header))
    for epochs, lr, temperature, alpha in CANDIDATES:
        scores = [
            distill(SAMPLE, pruned, data=train, evaluation=valid, epochs=epochs,
                    learning_rate=lr, temperature=temperature, alpha=alpha, seed=seed,
                    export=False).accuracy_after
            for seed in range(SWEEP_SEEDS)
        ]  # fmt: skip
        each = " ".join(f"{s:.4f}" for s in scores)
        print(
            f"{epochs:>6} {lr:>7.0e} {temperature:>4g} {alpha:>5g}  {each:<32} "
            f"{statistics.mean(scores):>6.4f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="training runs per method")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--sweep", action="store_true", help="the validation sweep instead")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write rows here")
    args = parser.parse_args()

    teacher = onnxforge.export(SAMPLE)
    pruned = onnxforge.optimize(teacher.clone(), PRUNING).model
    if args.sweep:
        return sweep(pruned)
    teacher_accuracy, pruned_accuracy = held_out(teacher), held_out(pruned)

    rows = []
    for method, alpha in (("distill (KL + CE)", None), ("fine-tune (CE only)", 0.0)):
        accuracies, seconds = [], []
        for seed in range(args.seeds):
            options = {"alpha": alpha} if alpha is not None else {}
            result = distill(
                SAMPLE, pruned, sample=SAMPLE, epochs=args.epochs, seed=seed, **options
            )
            accuracies.append(held_out(result.model))  # the exported student
            seconds.append(result.train_seconds)
            settings = result.settings
        rows.append(
            {
                "method": method,
                "settings": {k: settings[k] for k in ("epochs", "temperature", "alpha",
                                                      "learning_rate", "batch_size", "threads")},
                "accuracies": accuracies,
                "median": statistics.median(accuracies),
                "min": min(accuracies),
                "train_seconds_median": statistics.median(seconds),
            }
        )  # fmt: skip

    params = {
        name: model_stats(model).parameters
        for name, model in (("teacher", teacher), ("pruned", pruned))
    }
    print(
        f"{SAMPLE}: held-out top-1 (360 images) of the float teacher {teacher_accuracy:.4f} "
        f"({params['teacher']:,} parameters); pruned with {PRUNING} "
        f"({params['pruned']:,} parameters): {pruned_accuracy:.4f} without retraining"
    )
    print(f"retrained on the 1,437 training images, seeds 0..{args.seeds - 1}:")
    header = (
        f"{'method':<20} {'per seed':<{8 * args.seeds}} {'median':>7} {'min':>7} "
        f"{'median - teacher':>17} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        each = " ".join(f"{a:.4f}" for a in row["accuracies"])
        print(
            f"{row['method']:<20} {each:<{8 * args.seeds}} {row['median']:>7.4f} "
            f"{row['min']:>7.4f} {row['median'] - teacher_accuracy:>+17.4f} "
            f"{row['train_seconds_median']:>8.1f}"
        )
    s = rows[0]["settings"]
    print(
        f"settings: {s['epochs']} epochs, T={s['temperature']:g}, alpha={s['alpha']:g} "
        f"(fine-tune: 0), Adam lr {s['learning_rate']:g} cosine, batch {s['batch_size']}, "
        f"{s['threads']} torch thread(s)"
    )
    distilled = rows[0]
    within = sum(a >= teacher_accuracy - BAR for a in distilled["accuracies"])
    passed = distilled["median"] >= teacher_accuracy - BAR
    verdict = "meets" if passed else "MISSES"
    print(
        f"bar: median distilled top-1 within {BAR * 100:g} point of the teacher: {verdict} "
        f"({within}/{len(distilled['accuracies'])} seeds within it)"
    )
    if args.json is not None:
        payload = {
            "teacher_accuracy": teacher_accuracy,
            "pruned_accuracy": pruned_accuracy,
            "parameters": params,
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

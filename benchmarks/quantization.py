"""Quantization benchmark: onnxforge's ``quantize`` against ONNX Runtime's default recipes.

For each model, the same export is quantized by onnxforge (a pipeline ending in ``quantize``)
and by ONNX Runtime's documented recipes, measured in the same run: ``quant_pre_process`` then
``quantize_dynamic`` (defaults, and ``per_channel=True``), ONNX Runtime's transformers optimizer
then ``quantize_dynamic`` (minilm); ``quant_pre_process`` then ``quantize_static`` (defaults:
QDQ, int8 activations and weights, per tensor; and ONNX Runtime's advice for x86: uint8
activations, per channel) on the sample's calibration data (CNNs). Every model runs on ONNX
Runtime on the CPU with all graph optimisations on, as a user would deploy it. Latencies are
medians over rounds that interleave the candidates (so machine noise hits all alike), each round
a median of timed runs, measured in a fresh process; ratios are against the float export.
Accuracy is measured on the sample's held-out data: the worst sentence's embedding cosine
against float (minilm, resnet), top-1 accuracy against the labels (digits-cnn).

    python benchmarks/quantization.py [--models minilm digits-cnn resnet] [--rounds 5]

The bars (issue 6): minilm at batch 8, sequence 128, >= 2.2x the float export with worst
cosine >= 0.995; digits-cnn static QDQ at batch 256 >= 1.8x with held-out accuracy at most 0.5
points below float; resnet static >= 2x (batch 8).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import logging
import multiprocessing
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx

import onnxforge
from onnxforge.backend import Session
from onnxforge.backend.benchmark import time_runs
from onnxforge.errors import first_line
from onnxforge.samples import get_sample

SEQUENCE = 128
BATCH = {"minilm": 8, "digits-cnn": 256, "resnet": 8}
OURS = {
    "minilm": "fold-constants,cleanup,fuse,quantize{data=sample:minilm,smooth=0.7,budget=0.005}",
    "digits-cnn": "fold-constants,cleanup,fuse,"
    "quantize{mode=static,data=sample:digits-cnn,budget=0.005}",
    "resnet": "fold-constants,cleanup,fuse,quantize{mode=static,data=sample:resnet}",
}
# (speed-up at least, accuracy bar): cosine at least, or top-1 drop at most
BARS = {
    "minilm": (2.2, ("cosine", 0.995)),
    "digits-cnn": (1.8, ("drop", 0.005)),
    "resnet": (2.0, None),
}
HEADS = {"minilm": (12, 384)}


class _Reader:
    """ONNX Runtime's calibration reader over a sample's calibration batches."""

    def __init__(self, name: str) -> None:
        self._batches = iter(get_sample(name).calibration_data())

    def get_next(self):
        return next(self._batches, None)


def _timed(make: Callable[[], pathlib.Path]):
    start = time.perf_counter()
    try:
        model = make()
    except Exception as error:  # a recipe that fails is a row, not the end of the benchmark
        return None, time.perf_counter() - start, f"failed: {first_line(error)[:90]}"
    return model, time.perf_counter() - start, "ok"


def _candidates(name: str, path: pathlib.Path, tmp: pathlib.Path) -> dict:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    def pre_processed() -> pathlib.Path:
        out = tmp / "pre.onnx"
        if not out.exists():  # symbolic shape inference fails on these exports: skip it
            with contextlib.redirect_stdout(io.StringIO()):  # it prints what failed
                quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
        return out

    def ort(label: str, **options) -> Callable[[], pathlib.Path]:
        def make() -> pathlib.Path:
            out = tmp / f"{label}.onnx"
            if name == "minilm":
                quantize_dynamic(pre_processed(), out, **options)
            else:
                quantize_static(pre_processed(), out, _Reader(name), **options)
            return out

        return make

    def ort_transformers() -> pathlib.Path:
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = HEADS[name]
        optimized = tmp / "ort-optimized.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # its shape inference prints failures
            optimized_model = optimize_model(
                str(path), model_type="bert", num_heads=heads, hidden_size=hidden
            )
        optimized_model.save_model_to_file(str(optimized))
        out = tmp / "ort-optimized-q.onnx"
        quantize_dynamic(optimized, out)
        return out

    def onnxforge_pipeline(pipeline: str) -> Callable[[], pathlib.Path]:
        def make():
            result = onnxforge.optimize(onnxforge.load(path), pipeline)
            return onnxforge.save(result.model, tmp / f"ours-{len(pipeline)}.onnx")

        return make

    rows = {"float export (no quantization)": (path, 0.0, "ok")}
    if name == "minilm":
        rows["onnxforge fold-constants,cleanup,fuse (float)"] = _timed(
            onnxforge_pipeline("fold-constants,cleanup,fuse")
        )
        rows["ORT pre-process + quantize_dynamic (defaults)"] = _timed(ort("dyn-default"))
        rows["ORT pre-process + quantize_dynamic per_channel"] = _timed(
            ort("dyn-pc", per_channel=True)
        )
        rows["ORT transformers optimizer + quantize_dynamic"] = _timed(ort_transformers)
    else:
        rows["ORT pre-process + quantize_static (defaults)"] = _timed(ort("static-default"))
        rows["ORT pre-process + quantize_static U8S8 per_channel"] = _timed(
            ort(
                "static-u8s8",
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        )
    rows[f"onnxforge {OURS[name]}"] = _timed(onnxforge_pipeline(OURS[name]))
    return rows


def _timing_feed(name: str, batch: int) -> dict[str, np.ndarray]:
    if name == "minilm":
        from onnxforge.samples.minilm import sentences, tokenize

        texts = sentences()
        return tokenize([texts[i % len(texts)] for i in range(batch)], sequence=SEQUENCE)
    inputs, _ = get_sample(name).evaluation_data()
    return {k: np.resize(v, (batch, *v.shape[1:])) for k, v in inputs.items()}


def _accuracy(name: str, sessions: dict[str, Session], base: str) -> dict[str, str]:
    """Per candidate: worst cosine vs float (minilm, resnet), or held-out top-1 (digits-cnn)."""
    inputs, labels = get_sample(name).evaluation_data()
    rows = len(next(iter(inputs.values())))
    outputs: dict[str, np.ndarray] = {}
    for label, session in sessions.items():
        parts = [
            session.run({k: v[start : start + 8] for k, v in inputs.items()})[0]
            for start in range(0, rows, 8)
        ]
        outputs[label] = np.concatenate(parts)
    reference = outputs[base]
    figures = {}
    for label, out in outputs.items():
        if labels is not None:
            accuracy = float(np.mean(out.argmax(1) == labels))
            drop = float(np.mean(reference.argmax(1) == labels)) - accuracy
            figures[label] = (f"top-1 {accuracy:.4f} (drop {100 * drop:.2f} pt)", drop)
        else:
            r, g = reference.reshape(rows, -1), out.reshape(rows, -1)
            cos = np.sum(r * g, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1))
            figures[label] = (f"worst cosine {cos.min():.4f}", float(cos.min()))
    return figures


def _time_candidates(
    paths: dict[str, str],
    feed: dict[str, np.ndarray],
    batch: int,
    rounds: int,
    runs: int,
    threads: int | None,
) -> dict[str, list[float]]:
    """p50 latency of each model in each round; rounds interleave the models."""
    sessions = {label: Session(path, threads=threads) for label, path in paths.items()}
    p50s: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            bound = session.bind(feed)
            p50s[label].append(time_runs(bound.run, batch=batch, warmup=2, runs=runs).p50_ms)
    return p50s


def _bench_model(name: str, args) -> list[str]:
    batch = args.batch or BATCH[name]
    with tempfile.TemporaryDirectory() as folder:
        tmp = pathlib.Path(folder)
        path = onnxforge.save(onnxforge.export(name), tmp / f"{name}.onnx")
        candidates = _candidates(name, path, tmp)
        feed = _timing_feed(name, batch)
        sessions: dict[str, Session] = {}
        for label, (model, seconds, _status) in candidates.items():
            if model is None:
                continue
            try:
                session = Session(model, threads=args.threads)
                session.run(feed)
            except Exception as error:
                candidates[label] = (None, seconds, f"does not run: {first_line(error)[:90]}")
                continue
            sessions[label] = session
        base = "float export (no quantization)"
        accuracy = _accuracy(name, sessions, base)
        paths = {label: str(candidates[label][0]) for label in sessions}
        del sessions
        # Timed in a fresh process: sessions (and whatever ONNX Runtime's quantizer tools keep)
        # left alive in this one slowed every later session down, unevenly.
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            p50s = pool.submit(
                _time_candidates, paths, feed, batch, args.rounds, args.runs, args.threads
            ).result()
        nodes = {
            label: len(onnx.load(str(m), load_external_data=False).graph.node)
            for label, (m, _, _) in candidates.items()
            if m is not None
        }
    latency = {label: statistics.median(v) for label, v in p50s.items()}
    threads = args.threads or "all"
    lines = [
        f"## {name}: batch {batch}"
        + (f", sequence {SEQUENCE}" if name == "minilm" else "")
        + f", ONNX Runtime CPU, {threads} threads, median of {args.rounds} rounds x "
        f"{args.runs} runs",
        "",
        "| recipe | nodes | build s | p50 ms | vs float | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for label, (_, seconds, status) in candidates.items():
        if label not in latency:
            lines.append(f"| {label} | - | {seconds:.1f} | - | - | {status} |")
            continue
        lines.append(
            f"| {label} | {nodes[label]} | {seconds:.1f} | {latency[label]:.2f} | "
            f"{latency[base] / latency[label]:.2f}x | {accuracy[label][0]} |"
        )
    ours = next(
        label for label in candidates if label.startswith("onnxforge") and "quantize" in label
    )
    if ours in latency:
        speedup = latency[base] / latency[ours]
        least, accuracy_bar = BARS[name]
        verdict = {True: "PASS", False: "FAIL"}
        bar = f"bars: {speedup:.2f}x vs >= {least}x -> {verdict[speedup >= least]}"
        if accuracy_bar is not None:
            kind, limit = accuracy_bar
            value = accuracy[ours][1]
            ok = value >= limit if kind == "cosine" else value <= limit
            shown = f"{value:.4f}" if kind == "cosine" else f"{100 * value:.2f} pt"
            wanted = f">= {limit}" if kind == "cosine" else f"<= {100 * limit:.1f} pt"
            bar += f"; {kind} {shown} vs {wanted} -> {verdict[ok]}"
        lines += ["", bar]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "digits-cnn", "resnet"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="default: the bar's batch")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # ONNX Runtime's quantizer logs at warning
    for name in args.models:
        sys.stdout.write("\n".join(_bench_model(name, args)) + "\n\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

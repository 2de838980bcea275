"""Fusion benchmark: onnxforge's pipeline against the graph simplifiers and optimizers.

For each model, the same export is optimised by onnxforge (`fold-constants,cleanup,fuse`),
onnxsim, onnxslim, the onnxscript optimizer, and ONNX Runtime's transformers optimizer; each
result then runs on ONNX Runtime (CPU, all graph optimisations on, as a user would deploy it).
Latencies are medians over rounds that interleave the candidates (so machine noise hits all
alike), each round a median of timed runs; optimisation times are medians of three runs of
each optimiser (from a file, as a user would call it). Prints one table per model with nodes,
optimisation time, p50 latency, the ratio to the plain export and to the best peer, and the
output error against the plain export.

    python benchmarks/fusion.py [--models transformer minilm] [--rounds 5] [--batch 8]

Peers come from the `bench` extra: pip install 'onnxforge[bench]'.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.backend.benchmark import time_runs
from onnxforge.errors import first_line
from onnxforge.passes import available_passes
from onnxforge.samples import get_sample

SEQUENCE = 128
# transformer config of the samples, for ONNX Runtime's optimizer
HEADS = {"transformer": (4, 128), "minilm": (12, 384)}


def _pipeline() -> str:
    have = available_passes()
    return ",".join(p for p in ("fold-constants", "cleanup", "fuse") if p in have)


def _inputs(name: str, batch: int) -> dict[str, np.ndarray]:
    if name == "minilm":
        from onnxforge.samples.minilm import sentences, tokenize

        texts = sentences()
        return tokenize([texts[i % len(texts)] for i in range(batch)], sequence=SEQUENCE)
    ids, mask = get_sample(name).example_inputs(batch)
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 1000, (batch, SEQUENCE)).astype(np.int64),
        "attention_mask": np.ones((batch, SEQUENCE), np.int64),
    }


# Each optimiser runs this many times; its time is the median (one-shot times swung 3x here).
OPTIMISE_REPEATS = 3


def _timed(make: Callable[[], onnx.ModelProto]) -> tuple[onnx.ModelProto | None, float, str]:
    times = []
    for _ in range(OPTIMISE_REPEATS):
        start = time.perf_counter()
        try:
            model = make()
        except Exception as error:  # a peer that fails is a row, not the end of the benchmark
            first = first_line(error)
            return None, time.perf_counter() - start, f"failed: {first[:80]}"
        times.append(time.perf_counter() - start)
    return model, statistics.median(times), "ok"


def _candidates(
    path: pathlib.Path, name: str
) -> dict[str, tuple[onnx.ModelProto | None, float, str]]:
    heads, hidden = HEADS[name]
    pipeline = _pipeline()

    def ours() -> onnx.ModelProto:
        return ir.to_proto(onnxforge.optimize(onnxforge.load(path), pipeline).model)

    def onnxsim_() -> onnx.ModelProto:
        import onnxsim

        model, ok = onnxsim.simplify(onnx.load(path))
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
        return model

    def onnxslim_() -> onnx.ModelProto:
        import onnxslim

        return onnxslim.slim(onnx.load(path))

    def onnxscript_() -> onnx.ModelProto:
        import onnxscript.optimizer

        model = ir.load(path)
        onnxscript.optimizer.optimize(model)
        return ir.to_proto(model)

    def ort_transformers() -> onnx.ModelProto:
        from onnxruntime.transformers.optimizer import optimize_model

        return optimize_model(
            str(path), model_type="bert", num_heads=heads, hidden_size=hidden
        ).model

    return {
        "export (no optimisation)": (onnx.load(path), 0.0, "ok"),
        f"onnxforge {pipeline}": _timed(ours),
        "onnxsim": _timed(onnxsim_),
        "onnxslim": _timed(onnxslim_),
        "onnxscript optimizer": _timed(onnxscript_),
        "ORT transformers optimizer": _timed(ort_transformers),
    }


def _bench_model(name: str, args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = onnxforge.save(onnxforge.export(name), pathlib.Path(tmp) / f"{name}.onnx")
        candidates = _candidates(path, name)
        feed = _inputs(name, args.batch)
        sessions, reference = {}, None
        for label, (model, _, _status) in candidates.items():
            if model is None:
                continue
            try:
                session = Session(ir.from_proto(model))
                outputs = session.run(feed)
            except Exception as error:  # e.g. a peer that baked in a fixed sequence length
                first = first_line(error)
                candidates[label] = (None, candidates[label][1], f"does not run: {first[:90]}")
                continue
            sessions[label] = session
            if reference is None:
                reference = outputs
            candidates[label] = (
                model,
                candidates[label][1],
                f"rel-L2 {compare_outputs(reference, outputs).rel_l2:.1e}",
            )
        p50s: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(args.rounds):
            for label, session in sessions.items():
                bound = session.bind(feed)
                stats = time_runs(bound.run, batch=args.batch, warmup=3, runs=args.runs)
                p50s[label].append(stats.p50_ms)
    latency = {label: statistics.median(v) for label, v in p50s.items()}
    ours = next(label for label in candidates if label.startswith("onnxforge"))
    peers = [label for label in latency if label not in (ours, "export (no optimisation)")]
    best_peer = min(peers, key=latency.get) if peers else None
    base = latency["export (no optimisation)"]
    lines = [
        f"## {name}: batch {args.batch}, sequence {SEQUENCE}, ONNX Runtime CPU, median of "
        f"{args.rounds} rounds x {args.runs} runs",
        "",
        "| optimiser | nodes | optimise s | p50 ms | vs export | vs best peer | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (model, seconds, status) in candidates.items():
        if model is None or label not in latency:
            lines.append(f"| {label} | - | {seconds:.2f} | - | - | - | {status} |")
            continue
        nodes = len(model.graph.node)
        vs_peer = f"{latency[best_peer] / latency[label]:.2f}x" if best_peer else "-"
        lines.append(
            f"| {label} | {nodes} | {seconds:.2f} | {latency[label]:.2f} | "
            f"{base / latency[label]:.2f}x | {vs_peer} | {status} |"
        )
    if best_peer:
        peer_nodes = min(len(candidates[p][0].graph.node) for p in peers)  # those that ran
        ours_nodes = len(candidates[ours][0].graph.node)
        slim_seconds = candidates["onnxslim"][1]
        verdict = {True: "PASS", False: "FAIL"}
        lines += [
            "",
            f"bars: latency {latency[ours]:.2f} ms vs best peer ({best_peer}) "
            f"{latency[best_peer]:.2f} ms -> {verdict[latency[ours] <= latency[best_peer]]}; "
            f"nodes {ours_nodes} vs fewest {peer_nodes} -> {verdict[ours_nodes <= peer_nodes]}; "
            f"optimise time {candidates[ours][1]:.2f} s vs onnxslim {slim_seconds:.2f} s -> "
            f"{verdict[candidates[ours][1] <= slim_seconds]}",
        ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["transformer", "minilm"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    lines: list[str] = []
    for name in args.models:
        lines += _bench_model(name, args) + [""]
    sys.stdout.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: ONNX Runtime's CUDA execution provider through onnxforge's backend.

One command does everything on the GPU machine: exports the samples, then times each one on
the CPU provider, on CUDA with plain ``run`` (host copies every call), on CUDA with IO binding
(tensors stay on the device), and on CUDA with IO binding plus a captured CUDA graph (static
shapes); then load-tests dynamic batching on CUDA. Medians of repeated runs after warm-up;
every CUDA timing waits for the device. Prints one table and writes it, with JSON, to
``--out`` (default ``$OUT`` when set, else ``benchmarks/out``).

    python benchmarks/gpu.py [--out DIR] [--runs N]

Needs onnxruntime-gpu (``pip install 'onnxforge[cuda]'``); import torch first so that CUDA
and cuDNN libraries resolve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

# isort: off
import torch  # first: it loads the CUDA libraries that onnxruntime-gpu links against
import onnxruntime as ort

# isort: on

import onnxforge
from onnxforge.backend import Session, benchmark, load_test
from onnxforge.backend.benchmark import time_runs
from onnxforge.samples import get_sample

SAMPLES = ("digits-cnn", "resnet", "transformer")
BATCHES = (1, 32)
LOAD_SAMPLES = ("digits-cnn", "transformer")


def _static_model(name: str, batch: int):
    """The sample exported with every dimension fixed, as CUDA graphs need."""
    sample = get_sample(name)
    return onnxforge.export(sample.build(), sample.example_inputs(batch), dynamic_batch=False)


def _feed(model, inputs) -> dict:
    names = [v.name for v in model.graph.inputs]
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        sys.stderr.write(f"error: no CUDAExecutionProvider in {providers}\n")
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    rows, skipped = [], []
    for name in SAMPLES:
        sample = get_sample(name)
        dynamic = onnxforge.export(name)
        for batch in BATCHES:
            inputs = sample.example_inputs(batch)
            feed = _feed(dynamic, inputs)
            static = _static_model(name, batch)
            timings = {}
            timings["cpu"] = benchmark(
                Session(dynamic, ep="cpu"), feed, runs=max(20, args.runs // 10)
            )
            cuda = Session(dynamic, ep="cuda")
            timings["cuda run()"] = time_runs(
                lambda s=cuda, f=feed: s.run(f), batch=batch, warmup=10, runs=args.runs
            )
            timings["cuda io-binding"] = benchmark(cuda, feed, warmup=10, runs=args.runs)
            error = None
            try:  # ORT refuses graph capture when any node (a shape op, say) runs on the CPU
                graph = Session(static, ep="cuda", cuda_graph=True).bind(feed)
            except onnxforge.InputError as refused:
                skipped.append(f"{name} batch {batch}: {refused}")
            else:
                timings["cuda io-binding + graph"] = time_runs(
                    graph.run, batch=batch, warmup=10, runs=args.runs
                )
                reference = Session(dynamic, ep="cpu").run(feed)
                error = onnxforge.backend.compare_outputs(reference, graph.outputs())
            for mode, stats in timings.items():
                rows.append(
                    {
                        "sample": name,
                        "batch": batch,
                        "mode": mode,
                        **stats.as_dict(),
                        "rel_l2_vs_cpu": error.rel_l2 if "graph" in mode else None,
                    }
                )
    load_rows = []
    for name in LOAD_SAMPLES:
        sample = get_sample(name)
        model = onnxforge.export(name)
        pool = _feed(model, sample.example_inputs(64))
        result = load_test(Session(model, ep="cuda"), pool, concurrency=16, requests_per_client=100)
        load_rows.append({"sample": name, **result.as_dict()})

    lines = [
        f"# GPU benchmark: {device}, {datetime.date.today()}",
        "",
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, medians of {args.runs} "
        "runs after warm-up (CPU: a tenth as many)",
        "",
        "| sample | batch | mode | p50 ms | p99 ms | samples/s | vs CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    cpu = {(r["sample"], r["batch"]): r["p50_ms"] for r in rows if r["mode"] == "cpu"}
    for r in rows:
        ratio = cpu[(r["sample"], r["batch"])] / r["p50_ms"]
        lines.append(
            f"| {r['sample']} | {r['batch']} | {r['mode']} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['throughput']:.0f} | {ratio:.1f}x |"
        )
    lines += [
        "",
        "Serving at concurrency 16 on CUDA (requests/s; p50/p99 ms):",
        "",
        "| sample | unbatched | batched | direct | batched / unbatched |",
        "|---|---|---|---|---|",
    ]
    for r in load_rows:
        u, b, d = r["unbatched"], r["batched"], r["direct"]
        lines.append(
            f"| {r['sample']} | {u['throughput']:.0f} ({u['p50_ms']:.2f}/{u['p99_ms']:.2f}) "
            f"| {b['throughput']:.0f} ({b['p50_ms']:.2f}/{b['p99_ms']:.2f}) "
            f"| {d['throughput']:.0f} ({d['p50_ms']:.2f}/{d['p99_ms']:.2f}) "
            f"| {r['speedup']:.2f}x |"
        )
    errors = [
        f"{r['sample']} batch {r['batch']}: {r['rel_l2_vs_cpu']:.1e}"
        for r in rows
        if r["rel_l2_vs_cpu"] is not None
    ]
    lines += ["", "CUDA graph outputs vs CPU (relative L2): " + "; ".join(errors)]
    lines += [f"CUDA graph not possible: {reason}" for reason in skipped]
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    (out / "gpu.md").write_text(table)
    (out / "gpu.json").write_text(
        json.dumps({"device": device, "latency": rows, "serving": load_rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

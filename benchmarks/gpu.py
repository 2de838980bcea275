"""GPU benchmark: onnxforge's CUDA pipeline against PyTorch and ONNX Runtime's own optimizer.

One command does everything on the GPU machine. Two parts, both run by default:

``pipeline`` (the CUDA target): for BERT-base and MiniLM-L6 (random weights from
``transformers`` configs, sequence 128) and ResNet-50 (224x224), batch 32, it exports each model
with onnxforge's frontend (static shapes), runs the ``cuda`` preset
(``fold-constants,cleanup,fuse{target=cuda},fp16{target=cuda},cuda-layout``) and times the
result on ONNX Runtime's CUDA provider with IO binding and a captured CUDA graph (and with the
provider options that ``fp16`` records for float16 convolutions, plus a ResNet-50 row without
them), next to PyTorch eager fp16, ``torch.compile`` (default and ``max-autotune``) and ONNX
Runtime's transformers optimizer with fp16 (ResNet-50: ONNX Runtime's fp16 converter alone) on
the same export and backend. Every timing is a median of CUDA-synchronised runs after warm-up;
the error of each fp16 result is its relative L2 distance to PyTorch float32 (TF32 off).
BERT-base's FLOPs give the fraction of the GPU's dense fp16 peak each row reaches.

``backend`` (issue: backend): the bundled samples on the CPU provider, on CUDA with plain
``run``, with IO binding, and with IO binding plus a CUDA graph; then dynamic batching.

Prints the tables and writes them, with JSON, to ``--out`` (default ``$OUT`` when set, else
``benchmarks/out``).

    python benchmarks/gpu.py [--parts pipeline,backend] [--models bert-base,minilm-l6,resnet50]
                             [--compile default,max-autotune] [--runs N] [--out DIR]

Needs onnxruntime-gpu (``pip install 'onnxforge[cuda]'``) and ``transformers``; torch is
imported first so that CUDA and cuDNN libraries resolve.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

# isort: off
import torch  # first: it loads the CUDA libraries that onnxruntime-gpu links against
import onnxruntime as ort

# isort: on
import numpy as np
from torch import nn

import onnxforge
from onnxforge.backend import Session, benchmark, compare_outputs, load_test
from onnxforge.backend.benchmark import time_runs
from onnxforge.passes.fp16 import CUDA_CONV_PROVIDER_OPTIONS
from onnxforge.presets import CUDA_PIPELINE
from onnxforge.samples import get_sample

SEQUENCE = 128
BATCH = 32
IMAGE = 224
# Dense fp16 tensor-core peak measured on the H200 (the issue's figure), for the roofline column.
PEAK_TFLOPS = 790.0
# The fastest PyTorch / ONNX Runtime figures the issue measured on an H200 (ms, batch 32).
ISSUE_REFERENCE_MS = {"bert-base": 2.11, "minilm-l6": 0.65, "resnet50": 2.66}


# -- models ---------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), BatchNorm after each, residual."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(body(x) + shortcut(x))."""
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 (torchvision's layout; torchvision itself is not needed)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = 64
        for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(Bottleneck(channels, width, stride))
                channels = width * 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class Encoder(nn.Module):
    """A ``transformers`` BertModel that returns the last hidden state."""

    def __init__(self, **config) -> None:
        super().__init__()
        import transformers

        self.bert = transformers.BertModel(
            transformers.BertConfig(**config), add_pooling_layer=False
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclasses.dataclass
class Workload:
    """A model, its inputs at batch 32, and what ONNX Runtime's optimizer needs to know."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    flops: float
    heads: int = 0
    hidden: int = 0

    @property
    def transformer(self) -> bool:
        return self.heads > 0


def _bert_flops(hidden: int, layers: int, intermediate: int) -> float:
    """Multiply-adds x 2 of the encoder layers: projections, feed-forward, two attention GEMMs."""
    per_token_layer = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * SEQUENCE * hidden
    return float(per_token_layer * layers * BATCH * SEQUENCE)


def _token_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (BATCH, SEQUENCE), generator=generator)
    return ids, torch.ones(BATCH, SEQUENCE, dtype=torch.int64)


def _bert(hidden: int, layers: int, heads: int, intermediate: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return Encoder(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
        ).eval()

    return build


def _resnet50() -> nn.Module:
    torch.manual_seed(0)
    return ResNet50().eval()


def _image_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)),)


WORKLOADS = {
    "bert-base": Workload(
        "bert-base", _bert(768, 12, 12, 3072), _token_inputs, _bert_flops(768, 12, 3072), 12, 768
    ),
    "minilm-l6": Workload(
        "minilm-l6", _bert(384, 6, 12, 1536), _token_inputs, _bert_flops(384, 6, 1536), 12, 384
    ),
    # ResNet-50: 4.1 GMACs per 224x224 image
    "resnet50": Workload("resnet50", _resnet50, _image_inputs, 2 * 4.1e9 * BATCH),
}


# -- timing ---------------------------------------------------------------------------------------


def median_ms(step: Callable[[], object], *, warmup: int, runs: int) -> float:
    """Median wall time of ``step`` in ms, the device synchronised after every call."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel_l2(reference: np.ndarray, got: np.ndarray) -> float:
    return compare_outputs([reference], [np.asarray(got, dtype=np.float32)]).rel_l2


def _torch_rows(work: Workload, module, inputs, reference, compile_modes, runs) -> list[dict]:
    rows = []
    half = module.half()
    cuda_inputs = [t.cuda().half() if t.is_floating_point() else t.cuda() for t in inputs]
    variants = [("torch fp16 eager", half)]
    for mode in compile_modes:
        variants.append((f"torch.compile {mode}", torch.compile(half, mode=mode)))
    for label, fn in variants:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                # the first call compiles; copy its output before CUDA-graph replays reuse it
                first = fn(*cuda_inputs).float().cpu().numpy()
                setup_s = time.perf_counter() - started
                ms = median_ms(lambda fn=fn: _step(fn, cuda_inputs), warmup=10, runs=runs)
                error = _rel_l2(reference, first)
            rows.append({"variant": label, "ms": ms, "rel_l2": error, "setup_s": setup_s})
        except Exception as failure:  # one peer's failure is that row's status
            rows.append({"variant": label, "status": _failure(failure)})
        torch.compiler.reset()
    return rows


def _step(fn, inputs) -> None:
    # a new step for torch.compile's CUDA graphs (max-autotune), a no-op otherwise
    torch.compiler.cudagraph_mark_step_begin()
    fn(*inputs)


def _failure(error: BaseException) -> str:
    return (
        f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    )


def _ort_rows(work: Workload, model_path: pathlib.Path, feed, reference, runs) -> list[dict]:
    """ONNX Runtime's own recipe: transformers optimizer + fp16 (CNNs: the fp16 converter)."""
    import onnx
    from onnxruntime.transformers import float16, optimizer

    label = "ORT transformers-optimizer fp16" if work.transformer else "ORT fp16 converter"
    started = time.perf_counter()
    try:
        if work.transformer:
            optimized = optimizer.optimize_model(
                str(model_path),
                model_type="bert",
                num_heads=work.heads,
                hidden_size=work.hidden,
                use_gpu=True,
                opt_level=0,
            )
            optimized.convert_float_to_float16(keep_io_types=True)
            proto = optimized.model
        else:
            proto = float16.convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
        path = model_path.with_name(f"{work.name}-ort.onnx")
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        setup_s = time.perf_counter() - started
    except Exception as failure:
        return [{"variant": label, "status": _failure(failure)}]
    return _onnx_rows(label, path, feed, reference, runs, setup_s)


def _onnx_rows(label, model, feed, reference, runs, setup_s, provider_options=None) -> list[dict]:
    """IO binding, and IO binding plus a CUDA graph where ONNX Runtime can capture one."""
    rows = []
    for graph in (False, True):
        variant = f"{label} (io-binding{' + graph' if graph else ''})"
        try:
            session = Session(model, ep="cuda", cuda_graph=graph, provider_options=provider_options)
            bound = session.bind(feed)
            ms = median_ms(bound.run, warmup=10, runs=runs)
            error = _rel_l2(reference, bound.outputs()[0])
            rows.append({"variant": variant, "ms": ms, "rel_l2": error, "setup_s": setup_s})
        except Exception as failure:
            rows.append({"variant": variant, "status": _failure(failure)})
    return rows


def pipeline_part(
    models, compile_modes, runs, out: pathlib.Path, provider_variants=(), peers: bool = True
) -> list[dict]:
    """Time every workload's variants; returns one row per (model, variant).

    ``provider_variants``: extra CUDA provider option sets to time our model with.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows: list[dict] = []
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="onnxforge-gpu-"))
    for name in models:
        work = WORKLOADS[name]
        module, inputs = work.build(), work.inputs()
        with torch.inference_mode():
            reference = module.cuda()(*[t.cuda() for t in inputs]).float().cpu().numpy()
        feed = {}
        model_rows: list[dict] = []
        try:
            started = time.perf_counter()
            exported = onnxforge.export(module.cpu().float(), inputs, dynamic_batch=False)
            export_s = time.perf_counter() - started
            feed = {v.name: t.numpy() for v, t in zip(exported.graph.inputs, inputs, strict=True)}
            path = workdir / f"{name}.onnx"
            onnxforge.save(exported, path)
            started = time.perf_counter()
            optimized = onnxforge.optimize(exported, CUDA_PIPELINE).model
            optimize_s = time.perf_counter() - started
            ours = workdir / f"{name}-onnxforge.onnx"
            onnxforge.save(optimized, ours)
            model_rows += _onnx_rows(
                "onnxforge cuda preset", ours, feed, reference, runs, optimize_s
            )
            variants = list(provider_variants)
            if not work.transformer:  # what fp16's recorded conv options gain: a row without
                variants.insert(0, {key: "0" for key in CUDA_CONV_PROVIDER_OPTIONS})
            for options in variants:
                label = ", ".join(f"{k}={v}" for k, v in options.items())
                model_rows += _onnx_rows(
                    f"onnxforge cuda preset, {label}",
                    ours,
                    feed,
                    reference,
                    runs,
                    optimize_s,
                    options,
                )
            if peers:
                model_rows += _ort_rows(work, path, feed, reference, runs)
            sys.stderr.write(f"{name}: export {export_s:.1f}s, optimize {optimize_s:.1f}s\n")
        except Exception as failure:
            traceback.print_exc()
            model_rows.append({"variant": "onnxforge export/optimize", "status": _failure(failure)})
        module = module.cuda()
        if peers:
            model_rows += _torch_rows(work, module, inputs, reference, compile_modes, runs)
        for row in model_rows:
            row["model"] = name
            row.setdefault("status", "ok")
            if "ms" in row:
                row["tflops"] = work.flops / (row["ms"] * 1e-3) / 1e12
        rows += model_rows
        del module
        torch.cuda.empty_cache()
        (out / "gpu-pipeline.json").write_text(json.dumps(rows, indent=2))  # partial results
    return rows


def pipeline_table(rows: list[dict]) -> list[str]:
    """The pipeline part's markdown table, ratios against the fastest peer of each model."""
    lines = [
        f"batch {BATCH}, sequence {SEQUENCE} (ResNet-50: {IMAGE}x{IMAGE}); medians of "
        "CUDA-synchronised runs after warm-up; error = relative L2 against PyTorch float32",
        "",
        "| model | variant | ms | vs fastest peer | TFLOP/s | of peak | rel. L2 | setup s "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        peers = [r["ms"] for r in mine if "ms" in r and not r["variant"].startswith("onnxforge")]
        best = min(peers) if peers else None
        for r in mine:
            if "ms" not in r:
                lines.append(
                    f"| {model} | {r['variant']} | - | - | - | - | - | - | {r['status']} |"
                )
                continue
            ratio = f"{best / r['ms']:.2f}x" if best else "-"
            lines.append(
                f"| {model} | {r['variant']} | {r['ms']:.3f} | {ratio} | {r['tflops']:.0f} | "
                f"{r['tflops'] / PEAK_TFLOPS:.0%} | {r['rel_l2']:.1e} | {r['setup_s']:.1f} | ok |"
            )
    lines += [
        "",
        "vs fastest peer: the fastest PyTorch or ONNX Runtime row of the same model divided by "
        "this row (above 1.00x is faster). The issue's reference H200 figures for the fastest "
        "peer: " + ", ".join(f"{k} {v} ms" for k, v in ISSUE_REFERENCE_MS.items()) + ".",
    ]
    return lines


# -- backend part (issue: backend) ----------------------------------------------------------------

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


def backend_part(runs: int) -> tuple[list[dict], list[dict], list[str]]:
    """CPU vs CUDA run() vs IO binding vs CUDA graphs; then serving on CUDA."""
    rows, skipped = [], []
    for name in SAMPLES:
        sample = get_sample(name)
        dynamic = onnxforge.export(name)
        for batch in BATCHES:
            inputs = sample.example_inputs(batch)
            feed = _feed(dynamic, inputs)
            static = _static_model(name, batch)
            timings = {}
            timings["cpu"] = benchmark(Session(dynamic, ep="cpu"), feed, runs=max(20, runs // 10))
            cuda = Session(dynamic, ep="cuda")
            timings["cuda run()"] = time_runs(
                lambda s=cuda, f=feed: s.run(f), batch=batch, warmup=10, runs=runs
            )
            timings["cuda io-binding"] = benchmark(cuda, feed, warmup=10, runs=runs)
            error = None
            try:  # ORT refuses graph capture when any node (a shape op, say) runs on the CPU
                graph = Session(static, ep="cuda", cuda_graph=True).bind(feed)
            except onnxforge.InputError as refused:
                skipped.append(f"{name} batch {batch}: {refused}")
            else:
                timings["cuda io-binding + graph"] = time_runs(
                    graph.run, batch=batch, warmup=10, runs=runs
                )
                reference = Session(dynamic, ep="cpu").run(feed)
                error = compare_outputs(reference, graph.outputs())
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
    return rows, load_rows, skipped


def backend_table(rows, load_rows, skipped) -> list[str]:
    """The backend part's markdown tables."""
    lines = [
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
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    parser.add_argument("--parts", default="pipeline,backend")
    parser.add_argument("--models", default=",".join(WORKLOADS))
    parser.add_argument("--compile", default="default,max-autotune", help="torch.compile modes")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--provider-options",
        action="append",
        default=[],
        metavar="K=V[;K=V]",
        help="an extra row of our model with these CUDA provider options (repeatable)",
    )
    parser.add_argument("--no-peers", action="store_true", help="time our pipeline only")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        sys.stderr.write(f"error: no CUDAExecutionProvider in {providers}\n")
        return 2
    parts = args.parts.split(",")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in WORKLOADS]
    if unknown:
        sys.stderr.write(f"error: unknown models {unknown}; choices: {', '.join(WORKLOADS)}\n")
        return 2
    device = torch.cuda.get_device_name(0)
    lines = [
        f"# GPU benchmark: {device}, {datetime.date.today()}",
        "",
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, onnxforge "
        f"{onnxforge.__version__}, medians of {args.runs} runs after warm-up",
        "",
    ]
    report: dict = {"device": device}
    if "pipeline" in parts:
        compile_modes = [m for m in args.compile.split(",") if m]
        variants = [
            dict(item.split("=", 1) for item in text.split(";") if item)
            for text in args.provider_options
        ]
        report["pipeline"] = pipeline_part(
            models, compile_modes, args.runs, out, variants, peers=not args.no_peers
        )
        lines += ["## CUDA pipeline vs PyTorch and ONNX Runtime", ""]
        lines += pipeline_table(report["pipeline"]) + [""]
    if "backend" in parts:
        rows, load_rows, skipped = backend_part(args.runs)
        report.update(latency=rows, serving=load_rows)
        lines += ["## Backend: CPU, CUDA, IO binding, CUDA graphs", ""]
        lines += backend_table(rows, load_rows, skipped)
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    (out / "gpu.md").write_text(table)
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

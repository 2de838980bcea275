"""The ``onnxforge`` command line. It owns all user-facing output: rich tables, progress, errors.

Exit codes: 0 ok, 1 a pass failed or verification failed, 2 bad input or usage. An error is
printed as one line, ``error: ... (hint: ...)``; the traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxforge import __version__
from onnxforge.errors import EXIT_VERIFICATION_FAILED, OnnxforgeError, PassError

__all__ = ["app", "main"]

app = typer.Typer(
    name="onnxforge",
    help=(
        "onnxforge: export PyTorch models to ONNX, rewrite them with a pipeline of verified "
        "passes, and run them with ONNX Runtime.\n\n"
        "Pipelines are text: 'cleanup' or 'fold-constants,fuse,prune{sparsity=0.5}'. "
        "See `onnxforge passes` for the passes and their options."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
out = Console(width=_PIPED_WIDTH)
err = Console(stderr=True, width=_PIPED_WIDTH)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"onnxforge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what each step does.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin",
            help="Import this Python module first, so that the passes it registers can be used "
            "(repeatable). Installed packages can use the 'onnxforge.passes' entry-point group.",
        ),
    ] = None,
) -> None:
    _state["debug"] = debug
    for module in plugin or []:
        _import_plugin(module)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _import_plugin(module: str) -> None:
    import importlib

    from onnxforge.errors import InputError

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise InputError(
            f"cannot import plugin module '{module}': {error}",
            hint="the module must be importable from here (check PYTHONPATH)",
        ) from None


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _drift(drift: dict[str, Any] | None) -> str:
    return "-" if not drift else f"{drift['rel_l2']:.2e}"


def _ledger_table(records, *, title: str, first_row: tuple[str, ...] | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in [
        ("#", "right"),
        ("pass", "left"),
        ("status", "left"),
        ("time", "right"),
        ("nodes", "right"),
        ("params", "right"),
        ("drift (rel-L2)", "right"),
        ("total drift", "right"),
    ]:
        table.add_column(name, justify=justify)
    if first_row:
        table.add_row(*first_row)
    for r in records:
        status = r.status if r.status != "ok" else ("changed" if r.modified else "no change")
        nodes = f"{r.nodes_before} -> {r.nodes_after}" if r.nodes_after is not None else "-"
        params = _bytes(r.parameter_bytes_after)
        time = f"{r.wall_s * 1000:.1f} ms" if r.wall_s is not None else "-"
        table.add_row(
            str(r.index),
            escape(r.text),
            status,
            time,
            nodes,
            params,
            _drift(r.drift),
            _drift(r.total_drift),
        )
    return table


class _PassProgress:
    """A rich progress bar advanced by the pass manager (an Instrument, duck-typed)."""

    def __init__(self, progress: Progress, task) -> None:
        self.progress, self.task = progress, task

    def before_pipeline(self, model, passes) -> None:
        self.progress.update(self.task, total=len(passes))

    def should_run(self, record, model) -> bool:
        return True

    def before_pass(self, record, model) -> None:
        self.progress.update(self.task, description=f"pass #{record.index} {record.text}")

    def after_pass(self, record, model) -> None:
        self.progress.advance(self.task)

    def after_pass_failed(self, record, model, error) -> None:
        self.progress.advance(self.task)

    def after_pipeline(self, result) -> None:
        self.progress.update(self.task, description="done")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _write_json(path: pathlib.Path, data: Any) -> None:
    from onnxforge.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _print_near_misses(explainer) -> None:
    table = Table(title=f"near-misses of {explainer.pass_name}", title_justify="left")
    for column in ("#", "rule", "nodes", "reason"):
        table.add_column(column)
    for index, miss in explainer.near_misses:
        table.add_row(
            str(index), escape(miss.rule), escape(", ".join(miss.nodes)), escape(miss.reason)
        )
    if not explainer.near_misses:
        table.add_row("", "(none)", "", "")
    out.print(table)


def _bisect(
    original,
    pipeline: str,
    *,
    inputs: pathlib.Path | None,
    ep: str,
    tolerance: float | None,
    fail: bool = False,
) -> None:
    """Bisect the pipeline on the final outputs and print the culprit; raise when ``fail``."""
    from onnxforge.backend import Session, compare_outputs, load_inputs, make_inputs
    from onnxforge.errors import VerificationError
    from onnxforge.optimize import VERIFY_BATCH
    from onnxforge.passes import bisect_pipeline, format_pass, parse_pipeline
    from onnxforge.passes.bisect import DEFAULT_BISECT_TOLERANCE

    tolerance = DEFAULT_BISECT_TOLERANCE if tolerance is None else tolerance
    feeds = load_inputs(inputs) if inputs is not None else make_inputs(original, batch=VERIFY_BATCH)
    with err.status("bisecting: running prefixes of the pipeline"):
        found = bisect_pipeline(
            original,
            pipeline,
            runner=Session.runner(ep=ep),
            compare=compare_outputs,
            inputs=feeds,
            tolerance=tolerance,
        )
    final = _drift(found.final) if found.final else "does not run"
    if not found.found:
        out.print(f"bisect: the final outputs are within tolerance (rel-L2 {final}, {tolerance:g})")
        return
    table = Table(
        title=f"bisect: the final outputs drift by rel-L2 {final}, past {tolerance:g}; "
        f"{found.probes} prefixes run",
        title_justify="left",
    )
    for column in ("first bad", "culprit", "drift with it (rel-L2)"):
        table.add_column(column)
    table.add_row("pass", escape(f"#{found.index} {found.pass_text}"), _error_or_drift(found.drift))
    if found.rewrite is not None:
        table.add_row("rewrite", escape(str(found.rewrite)), _error_or_drift(found.rewrite.drift))
    out.print(table)
    if fail:
        where = f"; first bad {found.rewrite}" if found.rewrite is not None else ""
        raise VerificationError(
            f"the final outputs drift by relative L2 {final} from the input model's, past the "
            f"bisect tolerance {tolerance:g}{where}",
            pass_name=found.pass_text,
            index=found.index,
            previous=tuple(format_pass(p) for p in parse_pipeline(pipeline)[: found.index]),
            hint="leave the pass out, or turn off the rule (see `onnxforge passes` for options)",
        )


def _error_or_drift(drift: dict[str, Any] | None) -> str:
    if drift and "error" in drift:
        return escape(str(drift["error"]))
    return _drift(drift)


@app.command()
def optimize(
    model: Annotated[pathlib.Path, typer.Argument(help="Input .onnx model (never overwritten).")],
    output: Annotated[
        pathlib.Path, typer.Option("--output", "-o", help="Where to write the result.")
    ],
    pipeline: Annotated[
        str | None,
        typer.Option(
            "--pipeline",
            "-p",
            help="Pipeline text, e.g. 'cleanup' (see `onnxforge passes`), or a preset "
            "name: default, cuda. Without it, the preset of --target.",
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Without -p: the preset to start from. cpu = fold-constants,cleanup,fuse; "
            "cuda = fold-constants,cleanup,fuse{target=cuda},fp16{target=cuda},cuda-layout "
            "(ONNX Runtime's CUDA fused ops in float16, convolutions shaped for cuDNN; run it "
            "with IO binding and CUDA graphs)."
        ),
    ] = "cpu",
    verify: Annotated[
        str,
        typer.Option(
            help="After each pass: none; structure (ONNX checker and strict shape "
            "inference); numeric (also run before/after with ONNX Runtime and "
            "compare outputs at the pass's tolerance)."
        ),
    ] = "structure",
    inputs: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="An .npz of inputs for --verify numeric (default: seeded random, batch 2)."
        ),
    ] = None,
    ep: Annotated[
        str, typer.Option(help="Execution provider for numeric checks: cpu or cuda.")
    ] = "cpu",
    budget: Annotated[
        float | None,
        typer.Option(
            help="Accuracy budget for lossy passes: largest relative L2 error against the input."
        ),
    ] = None,
    ledger: Annotated[
        pathlib.Path | None, typer.Option(help="Write the per-pass ledger as JSON here.")
    ] = None,
    reproducer: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="On a failing pass, save the model as it was before it into this folder."
        ),
    ] = None,
    print_ir: Annotated[
        str | None,
        typer.Option("--print-ir", help="Print the IR to stderr: before, after or after-change."),
    ] = None,
    explain: Annotated[
        str | None,
        typer.Option(
            help="List this pass's near-misses (e.g. fuse): matches its checks refused, with "
            "the reason each gave; for quantize, the nodes left float and what each costs."
        ),
    ] = None,
    bisect: Annotated[
        bool,
        typer.Option(
            "--bisect",
            help="When the final outputs drift from the input model's past --bisect-tolerance, "
            "find the first pass responsible (and, inside fuse, the first rewrite), print it "
            "and fail (exit 1) without writing -o.",
        ),
    ] = False,
    bisect_tolerance: Annotated[
        float | None,
        typer.Option(
            help="Largest relative L2 error of the final outputs --bisect accepts (default 1e-4)."
        ),
    ] = None,
) -> None:
    """Run a pipeline of passes over MODEL and write the result to -o, with per-pass checks."""
    from onnxforge.backend import load_inputs
    from onnxforge.io import load, save
    from onnxforge.optimize import optimize as run_optimize
    from onnxforge.passes import Explain, PrintIR
    from onnxforge.presets import PRESETS, TARGET_PRESETS

    if target not in TARGET_PRESETS:
        raise typer.BadParameter("use cpu or cuda", param_hint="--target")
    text = PRESETS.get(pipeline, pipeline) if pipeline else PRESETS[TARGET_PRESETS[target]]
    loaded = load(model)
    original = load(model) if bisect else None  # optimize rewrites `loaded` in place
    extra = []
    if print_ir is not None:
        if print_ir not in ("before", "after", "after-change"):
            raise typer.BadParameter("use before, after or after-change", param_hint="--print-ir")
        extra.append(PrintIR(print_ir, sink=lambda s: err.print(s, markup=False, highlight=False)))
    explainer = Explain(explain) if explain is not None else None
    if explainer is not None:
        extra.append(explainer)
    with _progress() as progress:
        extra.append(_PassProgress(progress, progress.add_task("optimizing", total=None)))
        try:
            result = run_optimize(
                loaded,
                text,
                verify=verify,
                ep=ep,
                budget=budget,
                reproducer_dir=reproducer,
                inputs=load_inputs(inputs) if inputs is not None else None,
                instruments=extra,
            )
        except PassError as error:
            progress.stop()
            if error.records:
                err.print(_ledger_table(error.records, title="passes run before the failure"))
            if ledger is not None and error.records:
                _write_json(
                    ledger,
                    {
                        "pipeline": text,
                        "status": "failed",
                        "error": str(error),
                        "passes": [r.as_dict() for r in error.records],
                    },
                )
            if original is not None:
                _bisect(original, text, inputs=inputs, ep=ep, tolerance=bisect_tolerance)
            raise
    if original is not None:
        _bisect(original, text, inputs=inputs, ep=ep, tolerance=bisect_tolerance, fail=True)
    save(result.model, output)
    if ledger is not None:
        _write_json(ledger, {**result.as_dict(), "status": "ok"})
    out.print(_ledger_table(result.records, title=f"{model} -> {output}"))
    if explainer is not None:
        _print_near_misses(explainer)
    out.print(f"wrote {output} (pipeline: {result.pipeline})")


@app.command("passes")
def list_passes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered passes: name, semantics, summary, options with their defaults."""
    from onnxforge.passes import available_passes
    from onnxforge.passes.pipeline import format_value

    rows = [
        {
            "name": name,
            "semantics": str(cls.semantics),
            "summary": cls.summary,
            "options": {
                s.name: {"type": s.type_text, "default": format_value(s.default)}
                for s in cls.options()
            },
        }
        for name, cls in available_passes().items()
    ]
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(title="passes (options go in braces: name{key=value,...})", title_justify="left")
    for column in ("pass", "semantics", "summary", "options (default)"):
        table.add_column(column)
    for row in rows:
        options = ", ".join(f"{k}: {v['type']} = {v['default']}" for k, v in row["options"].items())
        table.add_row(row["name"], row["semantics"], escape(row["summary"]), escape(options or "-"))
    out.print(table)


@app.command()
def inspect(
    model: Annotated[pathlib.Path, typer.Argument(help="An .onnx model.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a model's IR and opset versions, inputs and outputs, op histogram, sizes, provenance."""
    from onnxforge.io import load
    from onnxforge.model_info import describe_model

    info = describe_model(load(model))
    if as_json:
        out.print_json(data=info.as_dict())
        return
    out.print(f"[bold]{model}[/bold]")
    out.print(
        f"IR version {info.ir_version}; opsets "
        + ", ".join(f"{d} {v}" for d, v in info.opsets.items())
        + (f"; producer {info.producer}" if info.producer else "")
    )
    signature = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        signature.add_column(column)
    for kind, values in (("input", info.inputs), ("output", info.outputs)):
        for v in values:
            shape = "?" if v["shape"] is None else "[" + ", ".join(map(str, v["shape"])) + "]"
            signature.add_row(kind, escape(v["name"]), str(v["dtype"]), escape(shape))
    out.print(signature)
    ops = Table(title=f"{info.nodes} nodes", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info.ops.items():
        ops.add_row(op, str(count))
    out.print(ops)
    out.print(f"parameters: {info.parameters:,} ({_bytes(info.parameter_bytes)})")
    out.print(f"pipeline: {info.pipeline or '(none: not written by onnxforge optimize)'}")
    if info.onnxforge_version:
        out.print(f"written by onnxforge {info.onnxforge_version}")
    if info.cuda_provider_options:
        out.print(f"CUDA provider options on --ep cuda: {escape(info.cuda_provider_options)}")


def _parse_shape(text: str) -> tuple[str, list[int]]:
    from onnxforge.errors import InputError

    name, equals, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not equals or not name or not shape or min(shape) < 1:
        raise InputError(f"bad --input-shape '{text}'", hint="write NAME=1x3x224x224")
    return name, shape


def _export_table(title: str, report: dict) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("batch", "max abs", "rel L2", "worst cosine", "tolerance (rel L2)"):
        table.add_column(column, justify="right")
    for check in report["checks"]:
        table.add_row(
            str(check["batch"]),
            f"{check['max_abs']:.2e}",
            f"{check['rel_l2']:.2e}",
            f"{check['cosine']:.7f}",
            f"{report['tolerance']:g}",
        )
    return table


@app.command()
def export(
    spec: Annotated[
        str,
        typer.Argument(
            help="A bundled sample (see `onnxforge samples`), package.module:factory, a "
            "torch.export .pt2 archive, or any of the first two followed by @WEIGHTS "
            "(a state dict: .pt/.pth/.bin loaded weights-only, or .npz)."
        ),
    ],
    output: Annotated[
        pathlib.Path, typer.Option("--output", "-o", help="Where to write the .onnx.")
    ],
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    batch: Annotated[
        int | None, typer.Option(help="Batch size of the example inputs (default: 2).")
    ] = None,
    static: Annotated[
        bool, typer.Option("--static", help="Fix the batch size instead of leaving it dynamic.")
    ] = False,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="NAME=1x3x224x224: export with a random example input of this shape (repeatable).",
        ),
    ] = None,
) -> None:
    """Export a PyTorch model to ONNX and check it against PyTorch with ONNX Runtime.

    The check runs at the example batch and, when the batch is dynamic, at a second batch
    size; a difference past the sample's tolerance is an error (exit 1).
    """
    from onnxforge.frontend import EXPORT_CHECK_META_KEY
    from onnxforge.frontend import export as run_export
    from onnxforge.io import save

    shapes = dict(_parse_shape(text) for text in input_shape or [])
    with err.status(f"exporting {spec}"):
        model = run_export(
            spec, dynamic_batch=not static, opset=opset, batch=batch, input_shapes=shapes or None
        )
    save(model, output)
    report = model.meta[EXPORT_CHECK_META_KEY]
    title = (
        f"{spec}: exported with {report['exporter']} in {report['seconds']:.1f} s, "
        f"{report['nodes']} nodes; ONNX Runtime vs PyTorch"
    )
    out.print(_export_table(title, report))
    out.print(f"wrote {output}")


@app.command()
def samples(
    check: Annotated[
        bool,
        typer.Option("--check", help="Export every sample and print the export figures."),
    ] = False,
) -> None:
    """List the bundled samples; with --check, export each and show time, error and nodes."""
    from onnxforge.samples import available_samples

    table = Table(title="samples (use the name as an export SPEC)", title_justify="left")
    columns = ["sample", "summary", "data", "metric"]
    if check:
        columns += ["export s", "nodes", "rel L2 (worst)", "tolerance"]
    for column in columns:
        table.add_column(column)
    for name, sample in available_samples().items():
        data = ", ".join(
            kind
            for kind, present in (
                ("calibration", sample.calibration_data),
                ("training", sample.training_data),
                ("evaluation", sample.evaluation_data),
            )
            if present is not None
        )
        row = [name, sample.summary, data or "-", sample.metric]
        if check:
            from onnxforge.frontend import EXPORT_CHECK_META_KEY
            from onnxforge.frontend import export as run_export

            with err.status(f"exporting {name}"):
                report = run_export(name).meta[EXPORT_CHECK_META_KEY]
            row += [
                f"{report['seconds']:.1f}",
                str(report["nodes"]),
                f"{report['rel_l2']:.1e}",
                f"{report['tolerance']:g}",
            ]
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)


def _parse_dims(texts: list[str] | None) -> dict[str, int]:
    from onnxforge.errors import InputError

    dims = {}
    for text in texts or []:
        name, equals, value = text.partition("=")
        if not equals or not name or not value.isdigit() or int(value) < 1:
            raise InputError(f"bad --shape '{text}'", hint="write DIM=N, e.g. --shape sequence=16")
        dims[name] = int(value)
    return dims


_SHAPE_HELP = "Bind a symbolic dimension by name, e.g. sequence=16 (repeatable)."


@app.command()
def run(
    model: Annotated[pathlib.Path, typer.Argument(help="An .onnx model.")],
    inputs: Annotated[
        pathlib.Path | None, typer.Option(help="An .npz of inputs (default: seeded random).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size for random inputs.")] = 1,
    shape: Annotated[list[str] | None, typer.Option("--shape", help=_SHAPE_HELP)] = None,
    ep: Annotated[str, typer.Option(help="Execution provider: cpu, cuda or auto.")] = "cpu",
    save_to: Annotated[
        pathlib.Path | None, typer.Option("--save", help="Write the outputs to this .npz.")
    ] = None,
) -> None:
    """Run a model once with ONNX Runtime and print its outputs' shapes and summary figures."""
    import numpy as np

    from onnxforge.backend import Session, load_inputs, make_inputs
    from onnxforge.io import atomic_write_bytes, load

    loaded = load(model)
    dims = _parse_dims(shape)
    feed = (
        load_inputs(inputs) if inputs is not None else make_inputs(loaded, batch=batch, dims=dims)
    )
    # The file was validated by load() and is unchanged: ONNX Runtime reads it (and its external
    # data) itself, instead of a copy of a model that may be larger than 2 GB.
    session = Session(model, ep=ep)
    outputs = session.run(feed)
    table = Table(title=f"{model} on {session.ep}", title_justify="left")
    for column in ("output", "dtype", "shape", "mean", "min", "max"):
        table.add_column(column)
    for name, value in zip(session.output_names, outputs, strict=True):
        numeric = np.issubdtype(value.dtype, np.number) and value.size
        stats = (
            (f"{value.mean():.4g}", f"{value.min():.4g}", f"{value.max():.4g}")
            if numeric
            else ("-",) * 3
        )
        table.add_row(escape(name), str(value.dtype), escape(str(list(value.shape))), *stats)
    out.print(table)
    if save_to is not None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **dict(zip(session.output_names, outputs, strict=True)))
        atomic_write_bytes(save_to, buffer.getvalue())
        out.print(f"wrote {save_to}")


def _latency_table(rows: list[dict], ep: str) -> Table:
    table = Table(
        title=f"latency on {ep} (ratio: first model's p50 / this p50)", title_justify="left"
    )
    for column in (
        "model",
        "batch",
        "runs",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ± sd ms",
        "samples/s",
        "ratio",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    first = rows[0]["latency"]["p50_ms"]
    for row in rows:
        s = row["latency"]
        table.add_row(
            escape(row["model"]),
            str(s["batch"]),
            str(s["runs"]),
            f"{s['p50_ms']:.3f}",
            f"{s['p90_ms']:.3f}",
            f"{s['p99_ms']:.3f}",
            f"{s['mean_ms']:.3f} ± {s['stdev_ms']:.3f}",
            f"{s['throughput']:.1f}",
            f"{first / s['p50_ms']:.2f}x",
        )
    return table


def _load_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in (
        "model",
        "mode",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "gain",
        "ratio",
    ):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    first = rows[0]["batched"]["throughput"]
    for row in rows:
        for mode in ("unbatched", "batched", "direct"):
            s = row[mode]
            gain = s["throughput"] / row["unbatched"]["throughput"]
            table.add_row(
                escape(row["model"]) if mode == "unbatched" else "",
                mode,
                f"{s['throughput']:.1f}",
                f"{s['p50_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
                f"{s['mean_batch']:.1f}",
                f"{gain:.2f}x",
                f"{s['throughput'] / first:.2f}x" if mode == "batched" else "",
            )
    return table


@app.command()
def bench(
    models: Annotated[list[pathlib.Path], typer.Argument(help="One or more .onnx models.")],
    ep: Annotated[str, typer.Option(help="Execution provider: cpu, cuda or auto.")] = "cpu",
    batch: Annotated[int, typer.Option(help="Batch size of the timed runs.")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            help="ONNX Runtime intra-op threads, per instance (default: all cores, divided "
            "among the instances)."
        ),
    ] = None,
    shape: Annotated[list[str] | None, typer.Option("--shape", help=_SHAPE_HELP)] = None,
    inputs: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="An .npz of inputs (default: seeded random); its rows are the "
            "requests of a load test."
        ),
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 5,
    runs: Annotated[int | None, typer.Option(help="Timed runs (default: 2 s worth).")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds of timed runs.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Load test instead: this many closed-loop clients sending single "
            "requests, served unbatched, with dynamic batching, and directly."
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            help="Load test: largest dynamic batch (default: concurrency / instances, at most 16)."
        ),
    ] = None,
    instances: Annotated[
        int,
        typer.Option(
            min=1,
            help="Load test: sessions of the model, each running one batch at a time with its "
            "share of the cores (on a CPU, 2 one-thread instances beat one 2-thread session).",
        ),
    ] = 1,
    batch_timeout_ms: Annotated[
        float, typer.Option(help="Load test: longest wait of the oldest request for a batch.")
    ] = 2.0,
    requests: Annotated[int, typer.Option(help="Load test: requests per client.")] = 100,
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph",
            help="With --ep cuda, latency mode: capture the run as a CUDA graph and replay it "
            "(needs a model with static shapes whose every node runs on the GPU).",
        ),
    ] = False,
    as_json: Annotated[
        pathlib.Path | None, typer.Option("--json", help="Write the figures as JSON here.")
    ] = None,
) -> None:
    """Benchmark models side by side with ONNX Runtime; ratios are against the first model.

    Latency mode (default): warm-up, then timed runs on inputs bound to the device, p50/p90/p99
    and throughput. Load-test mode (--concurrency N): N clients each send single requests; the
    table shows unbatched serving, dynamic batching (up to --max-batch, waiting at most
    --batch-timeout-ms) and direct calls, with throughput in requests per second; with
    --instances K the server holds K sessions and runs up to K batches side by side.
    """
    from onnxforge.backend import benchmark, load_inputs, load_test, make_inputs
    from onnxforge.backend import instances as make_instances
    from onnxforge.backend.serving import default_max_batch
    from onnxforge.io import load

    if cuda_graph and concurrency is not None:
        raise typer.BadParameter("CUDA graphs need one fixed batch: drop --concurrency")
    if instances > 1 and concurrency is None:
        raise typer.BadParameter("--instances is for a load test: add --concurrency N")
    dims = _parse_dims(shape)
    given = load_inputs(inputs) if inputs is not None else None
    rows: list[dict] = []
    with _progress() as progress:
        for path in models:
            model = load(path)
            sessions = make_instances(
                model, instances, ep=ep, threads=threads, cuda_graph=cuda_graph
            )
            session = sessions[0]
            task = progress.add_task(f"{path.name}", total=runs)
            if concurrency is None:
                feed = given if given is not None else make_inputs(model, batch=batch, dims=dims)
                stats = benchmark(
                    session,
                    feed,
                    warmup=warmup,
                    runs=runs,
                    duration=duration,
                    on_run=lambda n, t=task: progress.update(t, completed=n),
                )
                rows.append({"model": str(path), "ep": session.ep, "latency": stats.as_dict()})
            else:
                largest = max_batch or default_max_batch(concurrency, instances)
                pool_rows = max(4 * largest, concurrency)
                pool = (
                    given if given is not None else make_inputs(model, batch=pool_rows, dims=dims)
                )
                progress.update(task, description=f"{path.name}: load test")
                result = load_test(
                    sessions,
                    pool,
                    concurrency=concurrency,
                    max_batch=largest,
                    batch_timeout_ms=batch_timeout_ms,
                    requests_per_client=requests,
                )
                rows.append({"model": str(path), "ep": session.ep, **result.as_dict()})
            progress.remove_task(task)
    if concurrency is None:
        out.print(_latency_table(rows, rows[0]["ep"]))
    else:
        title = (
            f"serving on {rows[0]['ep']} at concurrency {concurrency} (gain: vs unbatched; "
            f"ratio: batched requests/s vs the first model's)"
        )
        out.print(_load_table(rows, title))
    if as_json is not None:
        _write_json(as_json, {"ep": rows[0]["ep"], "models": rows})
        out.print(f"wrote {as_json}")


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return {"cosine": f"{value:.6f}", "top1": f"{value:.4f}"}.get(metric, f"{value:.2e}")


def _compare_table(result) -> Table:
    arrow = "higher" if result.higher_is_better else "lower"
    table = Table(
        title=f"{result.model} on {result.ep}, batch {result.batch}: {len(result.rows)} orderings "
        f"ranked by p50 latency (speedup: the original's p50 / this p50; {result.metric} on "
        f"{result.inputs_rows} rows, {arrow} is better; * Pareto-optimal, latency vs "
        f"{result.metric}; rows with one model letter produce the identical model)",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules: twelve columns and the pipelines fit
        collapse_padding=True,
    )
    longest = max([len(row.pipeline) for row in result.rows] + [len("(original)")])
    table.add_column("#", justify="right")
    # the pipeline is what the table is about: other columns give way before it wraps
    table.add_column("pipeline", min_width=min(longest, 64), overflow="fold")
    for column, justify in [
        ("model", "left"),
        ("status", "left"),
        ("p50 ms", "right"),
        ("speedup", "right"),
        ("samples/s", "right"),
        ("size", "right"),
        ("nodes", "right"),
        (result.metric, "right"),
        ("optimize s", "right"),
        ("pareto", "center"),
    ]:
        table.add_column(column, justify=justify)

    def cells(row, rank: str, pipeline: str) -> list[str]:
        ok = row.status == "ok"
        return [
            rank,
            escape(pipeline),
            row.model or "-",
            row.status,
            f"{row.latency_ms:.4g}" if ok else "-",
            f"{row.speedup:.2f}x" if ok and row.speedup else "-",
            f"{row.throughput:.1f}" if ok else "-",
            _bytes(row.size_bytes),
            str(row.nodes) if row.nodes is not None else "-",
            _metric_text(row.metric, result.metric) if ok else "-",
            f"{row.optimize_s:.2f}" if row.optimize_s is not None else "-",
            "*" if row.pareto else "",
        ]

    table.add_row(*cells(result.original, "", "(original)"), end_section=True)
    for row in result.rows:
        table.add_row(*cells(row, str(row.rank or ""), row.pipeline))
    return table


def _contributions_table(result) -> Table:
    table = Table(
        title=f"per-pass contributions of the fastest ordering, {result.best}",
        title_justify="left",
    )
    for column in ("#", "pass", "p50 ms", "change", "nodes", "size", result.metric, "ops"):
        table.add_column(column, justify="left" if column in ("pass", "ops") else "right")
    for entry in result.contributions:
        latency, delta = entry["latency_ms"], entry["delta_latency_ms"]
        ops = ", ".join(f"{op} {n:+d}" for op, n in (entry["ops_delta"] or {}).items())
        table.add_row(
            str(entry["index"]),
            escape(entry["pass"]),
            f"{latency:.4g}" if latency is not None else "-",
            f"{delta:+.3g}" if delta is not None else "-",
            f"{entry['nodes']} ({entry['delta_nodes']:+d})" if entry["nodes"] is not None else "-",
            _bytes(entry["size_bytes"]),
            _metric_text(entry["metric"], result.metric),
            escape(ops or "-"),
        )
    return table


@app.command()
def compare(
    model: Annotated[
        str,
        typer.Argument(
            help="An .onnx model, or an export spec (a bundled sample: its evaluation data "
            "and metric are the defaults)."
        ),
    ],
    pipeline: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline", "-p", help="An ordering to compare (repeatable), or a preset name."
        ),
    ] = None,
    permute: Annotated[
        str | None,
        typer.Option(help="Compare every ordering of these passes, e.g. fold-constants,fuse."),
    ] = None,
    ablate: Annotated[
        str | None,
        typer.Option(help="Compare this pipeline with each of its passes left out in turn."),
    ] = None,
    ep: Annotated[str, typer.Option(help="Execution provider: cpu or cuda.")] = "cpu",
    metric: Annotated[
        str | None,
        typer.Option(
            help="cosine (worst row vs the original), top1 (accuracy on labels, else agreement "
            "with the original), rel-l2; default: the sample's, else cosine."
        ),
    ] = None,
    data: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="An .npz of inputs for the metric (an array named 'labels' holds labels); "
            "default: the sample's evaluation data, else seeded random rows."
        ),
    ] = None,
    batch: Annotated[
        int, typer.Option(help="Latency is measured on this many rows of the inputs.")
    ] = 1,
    threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime intra-op threads per session.")
    ] = None,
    runs: Annotated[int | None, typer.Option(help="Timed runs per distinct model.")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds of timed runs per distinct model (default 1).")
    ] = None,
    verify: Annotated[
        str, typer.Option(help="Check each intermediate model once: none, structure, numeric.")
    ] = "numeric",
    budget: Annotated[
        float | None,
        typer.Option(help="Accuracy budget for lossy passes (relative L2 against the original)."),
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local (this machine) or ray (Ray tasks, e.g. on a cluster).")
    ] = "local",
    jobs: Annotated[
        int | None,
        typer.Option(
            help="Jobs at a time: worker processes (local; default 1, in this process) or Ray "
            "tasks (default: the cluster's CPUs / threads)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to connect to (default: RAY_ADDRESS, else a local Ray)."),
    ] = None,
    as_json: Annotated[
        pathlib.Path | None, typer.Option("--json", help="Write the table as JSON here.")
    ] = None,
    report: Annotated[
        pathlib.Path | None,
        typer.Option(help="Write a self-contained HTML report with plots here."),
    ] = None,
) -> None:
    """Compare orderings of passes on one model: latency, size, nodes, accuracy, Pareto front.

    Orderings come from -p (repeatable), --permute (every ordering of the passes) or --ablate
    (the pipeline with each pass left out in turn). Common prefixes run once; each
    intermediate model is verified once; an ordering that fails is a row with its status.
    """
    from onnxforge.backend import load_inputs
    from onnxforge.compare import ablations, permutations
    from onnxforge.compare import compare as run_compare
    from onnxforge.errors import InputError
    from onnxforge.presets import PRESETS

    given = [option for option in (pipeline, permute, ablate) if option]
    if len(given) != 1:
        raise InputError(
            "give the orderings one way", hint="use -p PIPELINE (repeatable), --permute or --ablate"
        )
    if pipeline:
        orderings = [PRESETS.get(text, text) for text in pipeline]
    elif permute:
        orderings = permutations(PRESETS.get(permute, permute))
    else:
        orderings = ablations(PRESETS.get(ablate, ablate))
    inputs = labels = None
    if data is not None:
        inputs = load_inputs(data)
        labels = inputs.pop("labels", None)
    if runs is not None and duration is not None:
        raise InputError("give --runs or --duration, not both")
    timing = {"runs": runs} if runs is not None else {"duration": duration or 1.0}
    with _progress() as progress:
        task = progress.add_task(f"preparing {model}", total=None)

        def on_progress(done: int, total: int, text: str) -> None:
            description = text or progress.tasks[task].description
            progress.update(task, completed=done, total=total, description=description)

        result = run_compare(
            model,
            orderings,
            ep=ep,
            inputs=inputs,
            labels=labels,
            metric=metric,
            executor=executor,
            jobs=jobs,
            batch=batch,
            threads=threads,
            verify=verify,
            budget=budget,
            ray_address=ray_address,
            on_progress=on_progress,
            **timing,
        )
    out.print(_compare_table(result))
    failures: dict[tuple, list[str]] = {}
    for row in result.rows:
        if row.status != "ok":
            key = (row.status, row.failed_pass or "measuring", row.error)
            failures.setdefault(key, []).append(row.pipeline)
    for (status, where, error), pipelines in failures.items():
        out.print(
            f"{status} at {where} ({len(pipelines)} ordering{'s' * (len(pipelines) > 1)}: "
            f"{'; '.join(pipelines)}): {error}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"{result.pass_runs} passes applied for the {result.pass_runs_unshared} in the "
        f"orderings (common prefixes ran once); {result.distinct_models} distinct models "
        f"measured; {result.wall_s:.1f} s on {result.executor} with {result.jobs} job(s)"
    )
    if result.best is not None:
        best = result.row(result.best)
        front = [r.pipeline for r in result.rows if r.pareto]
        if result.original.pareto:
            front.insert(0, "(original)")
        out.print(
            f"fastest: {result.best} ({best.speedup:.2f}x, {result.metric} "
            f"{_metric_text(best.metric, result.metric)}); Pareto front: {'; '.join(front)}",
            markup=False,
            highlight=False,
        )
        out.print(_contributions_table(result))
    if as_json is not None:
        _write_json(as_json, result.as_dict())
        out.print(f"wrote {as_json}")
    if report is not None:
        from onnxforge.report import write_report

        write_report(result, report)
        out.print(f"wrote {report}")
    if not any(row.status == "ok" for row in result.rows):
        failure = OnnxforgeError(
            f"every one of the {len(result.rows)} orderings failed",
            hint="see each row's status and error above",
        )
        failure.exit_code = EXIT_VERIFICATION_FAILED
        raise failure


@app.command()
def demo(
    out_dir: Annotated[
        pathlib.Path, typer.Option("--out", help="Folder for the exported and optimised models.")
    ] = pathlib.Path("demo-out"),
) -> None:
    """The main job on a bundled sample, end to end.

    Exports the sample CNN (checked against PyTorch), runs the default pipeline with per-pass
    verification, and prints each pass's time, node count, size and output drift.
    """
    from onnxforge.demo import run_demo

    with _progress() as progress:
        task = progress.add_task("starting", total=None)
        result = run_demo(
            out_dir,
            instruments=[_PassProgress(progress, task)],
            on_step=lambda step: progress.update(task, description=step),
        )
    check = result.export_check
    out.print(
        f"exported {result.sample}: ONNX Runtime vs PyTorch max abs {check['max_abs']:.2e}, "
        f"rel L2 {check['rel_l2']:.2e} -> {result.exported_path}"
    )
    exported = result.exported
    first = (
        "",
        "(exported)",
        "",
        "",
        str(exported.nodes),
        _bytes(exported.parameter_bytes),
        "",
        "",
    )
    out.print(
        _ledger_table(
            result.result.records, title=f"pipeline: {result.result.pipeline}", first_row=first
        )
    )
    if result.accuracy_before is not None:
        out.print(
            f"held-out top-1 accuracy: {result.accuracy_before:.4f} exported, "
            f"{result.accuracy_after:.4f} optimised"
        )
    out.print(f"wrote {result.optimized_path}")
    out.print(f"next: onnxforge inspect {result.optimized_path}")


def _accuracy_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value_text(value: dict) -> str:
    shape = "?" if value["shape"] is None else "[" + ", ".join(map(str, value["shape"])) + "]"
    return escape(f"{value['name']}: {value['dtype']}{shape}")


@app.command()
def distill(
    student: Annotated[
        str,
        typer.Argument(
            help="The student to train: an .onnx model (e.g. the output of prune; converted "
            "back to a trainable torch module, see docs/distill.md for the ops covered) or a "
            "spec (a sample, package.module:factory, or either followed by @WEIGHTS)."
        ),
    ],
    output: Annotated[
        pathlib.Path, typer.Option("--output", "-o", help="Where to write the trained .onnx.")
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="The float teacher: a spec or an .onnx model (default: the --sample's model)."
        ),
    ] = None,
    sample: Annotated[
        str | None,
        typer.Option(
            help="Train on this bundled sample's training split and measure held-out accuracy "
            "on its evaluation split (default: the teacher or student, when it is a sample name)."
        ),
    ] = None,
    data: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="Train on this .npz instead: one array per model input (named after it) and, "
            "optionally, integer class 'labels'."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the training data (default: 30).")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Softmax temperature T of the distillation term (default: 8)."),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Weight of the distillation term; 1 - alpha goes to cross-entropy (default: 0.9)."
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Adam learning rate, cosine schedule to zero (default: 0.01)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Examples per optimizer step (default: 64).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the shuffling, the only randomness (default: 0).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch threads for training; 1 is fastest for small models (default: 1)."
        ),
    ] = None,
    as_json: Annotated[
        pathlib.Path | None,
        typer.Option("--json", help="Write the settings, losses and accuracies as JSON here."),
    ] = None,
) -> None:
    """Retrain a pruned student to match its float teacher, and export it to ONNX.

    The loss is alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy. The
    trained student is exported through the frontend (checked against PyTorch); the table
    gives held-out top-1 accuracy of the teacher and of the student before and after.
    """
    from onnxforge.distill import distill as run_distill
    from onnxforge.distill import load_training_data
    from onnxforge.errors import InputError
    from onnxforge.io import save
    from onnxforge.samples import available_samples

    known = available_samples()
    if sample is None:
        sample = next((s for s in (teacher, student) if s in known), None)
    if teacher is None:
        if sample is None:
            raise InputError(
                "no teacher", hint="give --teacher SPEC_OR_MODEL, or --sample NAME to use its model"
            )
        teacher = sample
    training = load_training_data(data) if data is not None else None
    given = {
        "epochs": epochs,
        "temperature": temperature,
        "alpha": alpha,
        "learning_rate": lr,
        "batch_size": batch_size,
        "seed": seed,
        "threads": threads,
    }
    settings = {key: value for key, value in given.items() if value is not None}
    if training is None and sample is None:
        raise InputError("no training data", hint="give --sample NAME or --data TRAIN.npz")
    with _progress() as progress:
        task = progress.add_task("loading the teacher and the student", total=None)

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"loss {loss:.4f}")

        result = run_distill(
            teacher, student, sample=sample, data=training, on_progress=advance, **settings
        )
    save(result.model, output)
    out.print(
        f"distilled {escape(student)} from {escape(teacher)} in {result.train_seconds:.1f} s "
        f"({result.settings['epochs']} epochs on {result.settings['examples']} examples)"
    )
    table = Table(title="held-out top-1", title_justify="left")
    for column in ("model", "top-1", "vs teacher"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = result.teacher_accuracy
    for label, value in (
        ("teacher", base),
        ("student before", result.accuracy_before),
        ("student after (ONNX Runtime)", result.accuracy_after),
    ):
        delta = "-" if value is None or base is None else f"{value - base:+.4f}"
        table.add_row(label, _accuracy_text(value), delta)
    if base is None:
        out.print("held-out accuracy not measured: no labelled evaluation data (give --sample)")
    else:
        out.print(table)
    out.print(f"training loss per epoch: {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    if as_json is not None:
        _write_json(as_json, result.as_dict())
        out.print(f"wrote {as_json}")
    out.print(f"wrote {output}")


@app.command()
def ensemble(
    models: Annotated[
        list[pathlib.Path], typer.Argument(help="Two or more .onnx models with compatible inputs.")
    ],
    output: Annotated[
        pathlib.Path, typer.Option("--output", "-o", help="Where to write the merged .onnx.")
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="How outputs combine: mean (element-wise), max (element-wise), or vote "
            "(per-class counts of each member's argmax)."
        ),
    ] = "mean",
    match_inputs: Annotated[
        str,
        typer.Option(
            "--match-inputs", help="Match the members' inputs by name (default) or by position."
        ),
    ] = "name",
) -> None:
    """Merge models into one graph: inputs shared, outputs combined by --mode.

    Names are prefixed with each member's file stem so nothing clashes; members at older
    opsets are converted to the newest one. The result runs as one session and can be
    optimised as one model (e.g. `onnxforge optimize OUT -p fold-constants,cleanup,fuse`).
    """
    from onnxforge.ensemble import ensemble as run_ensemble
    from onnxforge.ensemble import member_names
    from onnxforge.io import load, save
    from onnxforge.model_info import describe_model

    loaded = [load(path) for path in models]
    names = member_names([path.stem for path in models])
    merged = run_ensemble(loaded, mode=mode, names=names, match_inputs=match_inputs)
    save(merged, output)
    table = Table(title=f"ensemble ({mode}) -> {output}", title_justify="left")
    for column in ("member", "file", "nodes", "parameters"):
        table.add_column(column, justify="left" if column in ("member", "file") else "right")
    rows = zip([*names, "(ensemble)"], [*models, output], [*loaded, merged], strict=True)
    for name, path, model in rows:
        info = describe_model(model)
        table.add_row(escape(name), escape(str(path)), str(info.nodes), f"{info.parameters:,}")
    out.print(table)
    info = describe_model(merged)
    out.print(
        "inputs ("
        + ", ".join(_value_text(v) for v in info.inputs)
        + ") -> outputs ("
        + ", ".join(_value_text(v) for v in info.outputs)
        + ")"
    )
    out.print(f"wrote {output}")


def main() -> None:
    """Entry point: run the app, turning onnxforge errors into one line and an exit code.

    Click handles usage errors itself (exit 2); everything else that escapes a command lands
    here.
    """
    try:
        app()
    except OnnxforgeError as error:
        if _state["debug"]:
            raise
        hint = f" (hint: {error.hint})" if error.hint else ""
        err.print(f"error: {error}{hint}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except Exception as error:  # a bug: say so in one line, the traceback only with --debug
        if _state["debug"]:
            raise
        err.print(
            f"error: internal error: {type(error).__name__}: {error} "
            "(hint: rerun with --debug for the traceback and report it)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_VERIFICATION_FAILED)

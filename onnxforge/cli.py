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


@app.command()
def optimize(
    model: Annotated[pathlib.Path, typer.Argument(help="Input .onnx model (never overwritten).")],
    output: Annotated[
        pathlib.Path, typer.Option("--output", "-o", help="Where to write the result.")
    ],
    pipeline: Annotated[
        str,
        typer.Option(
            "--pipeline",
            "-p",
            help="Pipeline text, e.g. 'cleanup' (see `onnxforge passes`), or a preset "
            "name: default.",
        ),
    ],
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
            "the reason each gave."
        ),
    ] = None,
) -> None:
    """Run a pipeline of passes over MODEL and write the result to -o, with per-pass checks."""
    from onnxforge.backend import load_inputs
    from onnxforge.io import load, save
    from onnxforge.optimize import optimize as run_optimize
    from onnxforge.passes import Explain, PrintIR
    from onnxforge.presets import PRESETS

    text = PRESETS.get(pipeline, pipeline)
    loaded = load(model)
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
            raise
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
    session = Session(loaded, ep=ep)
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
        int | None, typer.Option(help="ONNX Runtime intra-op threads (default: all cores).")
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
    max_batch: Annotated[int, typer.Option(help="Load test: largest dynamic batch.")] = 16,
    batch_timeout_ms: Annotated[
        float, typer.Option(help="Load test: longest wait of the oldest request for a batch.")
    ] = 2.0,
    requests: Annotated[int, typer.Option(help="Load test: requests per client.")] = 100,
    as_json: Annotated[
        pathlib.Path | None, typer.Option("--json", help="Write the figures as JSON here.")
    ] = None,
) -> None:
    """Benchmark models side by side with ONNX Runtime; ratios are against the first model.

    Latency mode (default): warm-up, then timed runs on inputs bound to the device, p50/p90/p99
    and throughput. Load-test mode (--concurrency N): N clients each send single requests; the
    table shows unbatched serving, dynamic batching (up to --max-batch, waiting at most
    --batch-timeout-ms) and direct calls, with throughput in requests per second.
    """
    from onnxforge.backend import Session, benchmark, load_inputs, load_test, make_inputs
    from onnxforge.backend.serving import DEFAULT_MAX_BATCH
    from onnxforge.io import load

    dims = _parse_dims(shape)
    given = load_inputs(inputs) if inputs is not None else None
    rows: list[dict] = []
    with _progress() as progress:
        for path in models:
            model = load(path)
            session = Session(model, ep=ep, threads=threads)
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
                pool_rows = max(4 * max(max_batch, DEFAULT_MAX_BATCH), concurrency)
                pool = (
                    given if given is not None else make_inputs(model, batch=pool_rows, dims=dims)
                )
                progress.update(task, description=f"{path.name}: load test")
                result = load_test(
                    session,
                    pool,
                    concurrency=concurrency,
                    max_batch=max_batch,
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

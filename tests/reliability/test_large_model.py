"""A model larger than 2 GiB, end to end through external data: load, passes, save, run.

The model is built here: eight float32[8192, 8192] weights (2 GiB) in one external data file,
plus inline biases, so model and data together pass protobuf's 2 GiB limit. Each weight is a
diagonal matrix, written as a sparse file (only the diagonal is written, so the input costs
~256 MiB of disk), which makes the outputs exact to compute with numpy. Every command runs in
a child of a small wrapper process that reports its peak resident memory (RUSAGE_CHILDREN).

It runs the default pipeline (fold-constants, cleanup, fuse), saves, loads and runs the
result, then the cuda preset (fuse for CUDA, then fp16) from the same input. Peak memory must
stay under twice the model's size: below its size for the default pipeline (the weights are
never all in memory at once), below 1.5 times for a run, and below twice for fp16, which
holds its half-precision copies as well. ``pytest -s`` prints the figures; docs/reliability.md
records them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.io import external_data_files

from .conftest import COMMAND

HIDDEN = 8192
LAYERS = 8
WEIGHT_BYTES = HIDDEN * HIDDEN * 4  # 256 MiB each, 2 GiB together

MEASURED = textwrap.dedent(
    """
    import resource, subprocess, sys
    result = subprocess.run(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"peak-rss {peak}", file=sys.stderr)
    sys.exit(result.returncode)
    """
)


def _diagonal(layer: int) -> np.float32:
    return np.float32(1.0 + (layer + 1) / 64)


def _bias(layer: int) -> np.ndarray:
    return np.full(HIDDEN, 0.01 * layer, np.float32)


def build(folder: pathlib.Path) -> tuple[pathlib.Path, int]:
    """Write the model (x -> [MatMul, Add, Relu] x 8 -> y) and its data; returns (path, bytes)."""
    data = folder / "big.onnx.data"
    diagonal = np.arange(HIDDEN, dtype=np.int64) * (HIDDEN + 1) * 4
    initializers, nodes, previous = [], [], "x"
    with open(data, "wb") as file:
        file.truncate(LAYERS * WEIGHT_BYTES)  # holes read as zeros
        for layer in range(LAYERS):
            value = _diagonal(layer).tobytes()
            for offset in diagonal + layer * WEIGHT_BYTES:
                os.pwrite(file.fileno(), value, int(offset))
            weight = TensorProto(name=f"w{layer}", data_type=TensorProto.FLOAT, dims=[HIDDEN] * 2)
            weight.data_location = TensorProto.EXTERNAL
            for key, entry in (
                ("location", data.name),
                ("offset", str(layer * WEIGHT_BYTES)),
                ("length", str(WEIGHT_BYTES)),
            ):
                weight.external_data.add(key=key, value=entry)
            initializers += [weight, numpy_helper.from_array(_bias(layer), f"b{layer}")]
            nodes += [
                helper.make_node("MatMul", [previous, f"w{layer}"], [f"m{layer}"]),
                helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"]),
                helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"]),
            ]
            previous = f"r{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", HIDDEN])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path, path.stat().st_size + data.stat().st_size


def expected(x: np.ndarray) -> np.ndarray:
    for layer in range(LAYERS):
        x = np.maximum(x * _diagonal(layer) + _bias(layer), 0)
    return x


def measured(*args: object, cwd: pathlib.Path, size: int) -> int:
    """Run the command line in a fresh wrapper; its peak resident memory in bytes (printed)."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *COMMAND, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("peak-rss ")]
    peak = int(line.split()[1])
    print(
        f"\n{' '.join(map(str, args))}: {time.monotonic() - start:.1f} s, peak RSS "
        f"{peak / 2**20:.0f} MiB = {peak / size:.2f} x the model ({size / 2**20:.0f} MiB)"
    )
    return peak


@pytest.mark.slow
def test_a_model_larger_than_2_gib_end_to_end(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        path, size = build(folder)
        assert size > 2 * 1024**3
        loaded = onnxforge.load(path)  # validated: every tensor's range lies inside the file
        assert len(loaded.graph.initializers) == 2 * LAYERS

        # The default pipeline, with structure checks after every pass, and the save.
        peak = measured("optimize", path, "-o", "out.onnx", "-p", "default", cwd=folder, size=size)
        assert peak < size
        out = folder / "out.onnx"
        (data_file,) = external_data_files(out)
        assert data_file.stat().st_size == LAYERS * (WEIGHT_BYTES + HIDDEN * 4)  # all, once
        ops = [node.op_type for node in onnx.load(out, load_external_data=False).graph.node]
        assert ops == ["FusedGemm"] * LAYERS  # fuse ran: MatMul + Add + Relu, eight times

        # Run the result with ONNX Runtime: the outputs are exact.
        x = np.linspace(-1, 2, 2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
        np.savez(folder / "x.npz", x=x)
        peak = measured("run", out, "--inputs", "x.npz", "--save", "y.npz", cwd=folder, size=size)
        assert peak < 1.5 * size
        with np.load(folder / "y.npz") as outputs:
            np.testing.assert_allclose(outputs["y"], expected(x), rtol=1e-6)
        for leftover in (out, data_file):
            leftover.unlink()

        # The cuda preset from the same input: fuse for CUDA, then fp16 (1 GiB of weights).
        peak = measured("optimize", path, "-o", "half.onnx", "-p", "cuda", cwd=folder, size=size)
        assert peak < 2 * size
        half = onnxforge.load(folder / "half.onnx")
        weights = [
            v.const_value for v in half.graph.initializers.values() if v.name.startswith("w")
        ]
        assert {w.dtype.name for w in weights} == {"FLOAT16"}
        (half_data,) = external_data_files(folder / "half.onnx")
        assert half_data.stat().st_size < size / 2 + 2**20
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 3 GiB: not for pytest to keep

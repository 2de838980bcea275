"""SIGKILL during a save leaves the old model or the new one, each with its own data, never a mix.

A child process saves model B over model A and is killed: at chosen points (while the data is
being written, between moving the data and the model into place, before the old data is
removed) and at random moments of a loop of saves. After every kill the target must load and
hold exactly A's or exactly B's weights, its data file must match the digest in its name, and
the next saves must clear what the killed saves left (temporary folders, data files no model
refers to). Two processes saving to one target at once leave one of their models whole.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import onnxforge
from onnxforge.io import TEMP_PREFIX, external_data_files

WEIGHT_ROWS = 512  # float32[512, 1024]: 2 MiB of external data per save
WEIGHT_COLUMNS = 1024
SAVES = 25  # per process, in the concurrent test

CHILD = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    import onnx_ir as ir
    import onnxforge
    import onnxforge.io as io

    target, point, seeds = pathlib.Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
    rows, columns = {rows}, {columns}

    def model(seed):
        w = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", columns])],
            [numpy_helper.from_array(w, "w")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        proto.ir_version = 10
        return ir.serde.deserialize_model(proto)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "writing-data":  # the data file is written, not yet flushed or moved
        io._fsync_file = die
    elif point == "between-renames":  # the new data is in place, the model is not
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if pathlib.Path(dst) == target:
                die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    elif point == "before-cleanup":  # the new model is in place, the old data not yet removed
        io._remove_replaced_data = die
    models = [model(seed) for seed in seeds]
    print("ready", flush=True)
    if point.startswith("count"):  # save this many times, then exit
        for _ in range(int(point[5:])):
            for m in models:
                onnxforge.save(m, target, external_data=True)
        print("done", flush=True)
        sys.exit(0)
    while True:  # the loop point saves until it is killed; the others die on the first save
        for m in models:
            onnxforge.save(m, target, external_data=True)
    """
).format(rows=WEIGHT_ROWS, columns=WEIGHT_COLUMNS)


def _weights(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((WEIGHT_ROWS, WEIGHT_COLUMNS)).astype(np.float32)


def _start(target, point: str, *seeds: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), point, *map(str, seeds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready", child.stderr.read()
    return child


def _seed_of(target) -> int:
    """Which model the target holds, after checking that it is whole and consistent."""
    (data_file,) = external_data_files(target)
    digest = hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert data_file.name == f"{target.name}.{digest[:16]}.data"  # the data is the one named
    weights = onnxforge.load(target).graph.initializers["w"].const_value.numpy()
    for seed in (1, 2):
        if np.array_equal(weights, _weights(seed)):
            return seed
    raise AssertionError("the target holds neither model's weights")


def _model(seed: int):
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WEIGHT_ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WEIGHT_COLUMNS])],
        [numpy_helper.from_array(_weights(seed), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def _data_files(target) -> list:
    return sorted(p.name for p in target.parent.glob(f"{target.name}.*.data"))


def _no_temporaries(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture
def target(tmp_path):
    """``model.onnx`` holding model 1, with its data file."""
    path = onnxforge.save(_model(1), tmp_path / "model.onnx", external_data=True)
    assert _seed_of(path) == 1
    return path


@pytest.mark.parametrize(
    ("point", "expected"),
    [("writing-data", 1), ("between-renames", 1), ("before-cleanup", 2)],
)
def test_killed_at_a_point_of_the_save(target, point, expected):
    child = _start(target, point, 2)
    assert child.wait(timeout=120) == -signal.SIGKILL
    assert _seed_of(target) == expected
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]
    if point != "before-cleanup":
        assert leftovers  # the killed save could not clean up after itself...
    onnxforge.save(onnxforge.load(target), target.parent / "other.onnx")
    assert _no_temporaries(target.parent)  # ...the next save did
    onnxforge.save(_model(1), target, external_data=True)  # and the next one to the target
    assert _data_files(target) == [external_data_files(target)[0].name]  # left no orphan data


def test_killed_at_random_moments_of_a_loop_of_saves(target):
    rng = random.Random(0)
    held = []
    for _ in range(4):
        child = _start(target, "loop", 2, 1)
        time.sleep(rng.uniform(0.02, 0.4))
        child.kill()
        child.wait()
        held.append(_seed_of(target))  # whole and consistent, whichever it is
    assert len(held) == 4
    onnxforge.save(_model(1), target, external_data=True)
    assert _data_files(target) == [external_data_files(target)[0].name]


def test_concurrent_saves_to_one_target_leave_one_of_them_whole(target):
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(target), f"count{SAVES}", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert out.split() == ["ready", "done"]
    assert _seed_of(target) in (1, 2)
    assert _data_files(target) == [external_data_files(target)[0].name]
    assert _no_temporaries(target.parent)

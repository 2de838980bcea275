"""The command line, run as a user runs it: in a subprocess, reading exit codes and output."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import onnxforge
from onnxforge.passes import available_passes

_MAIN = pathlib.Path(onnxforge.__file__).with_name("__main__.py")
COMMAND = (
    [sys.executable, "-m", "onnxforge"]
    if _MAIN.is_file()
    else [str(pathlib.Path(sys.executable).with_name("onnxforge"))]
)
# Wide enough that rich tables keep every cell on one line.
WIDE = "200"

GLOBAL_OPTIONS = ["--debug", "--verbose", "--version", "--plugin"]
SUBCOMMAND_OPTIONS = {
    "optimize": [
        "--output",
        "--pipeline",
        "--verify",
        "--inputs",
        "--ep",
        "--budget",
        "--ledger",
        "--reproducer",
        "--print-ir",
        "--explain",
        "--target",
    ],
    "passes": ["--json"],
    "inspect": ["--json"],
    "export": ["--output", "--opset", "--static", "--batch", "--input-shape"],
    "bench": [
        "--ep",
        "--batch",
        "--threads",
        "--shape",
        "--runs",
        "--duration",
        "--concurrency",
        "--max-batch",
        "--batch-timeout-ms",
        "--instances",
        "--cuda-graph",
        "--json",
    ],
    "samples": ["--check"],
    "run": ["--inputs", "--batch", "--shape", "--ep", "--save"],
    "demo": ["--out"],
    "distill": [
        "--output",
        "--teacher",
        "--sample",
        "--data",
        "--epochs",
        "--temperature",
        "--alpha",
        "--lr",
        "--batch-size",
        "--seed",
        "--threads",
        "--json",
    ],
    "ensemble": ["--output", "--mode", "--match-inputs"],
}

PLUGIN = textwrap.dedent(
    """
    import onnx_ir as ir

    from onnxforge.passes import Pass, PassResult, Semantics, register


    @register
    class ShiftBiasPass(Pass):
        name = "shift-bias"
        summary = "Claims to be exact but adds one to every initializer."
        semantics = Semantics.EXACT

        def call(self, model):
            for value in model.graph.initializers.values():
                shifted = value.const_value.numpy() + 1.0
                value.const_value = ir.tensor(shifted, name=value.name)
            return PassResult(model, True)


    @register
    class CrashPass(Pass):
        name = "crash"
        summary = "Raises inside the pass."
        semantics = Semantics.EXACT

        def call(self, model):
            raise RuntimeError("boom")
    """
)
PLUGIN_MODULE = "onnxforge_test_plugin"


def cli(
    *args: object, cwd: pathlib.Path, columns: str = WIDE, pythonpath: pathlib.Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": columns}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), os.environ.get("PYTHONPATH")) if p
        )
    return subprocess.run(
        [*COMMAND, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _node_count(path: pathlib.Path) -> int:
    return len(onnx.load(path, load_external_data=False).graph.node)


@pytest.fixture
def plugin_dir(tmp_path) -> pathlib.Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    return folder


# --- help, version, usage errors -------------------------------------------------------------


def test_help(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for word in [*GLOBAL_OPTIONS, *SUBCOMMAND_OPTIONS]:
        assert word in result.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_OPTIONS))
def test_subcommand_help(tmp_path, command):
    result = cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in result.stdout, f"{command} --help does not mention {option}"


def test_version(tmp_path):
    result = cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"onnxforge {onnxforge.__version__}"


def test_unknown_command(tmp_path):
    result = cli("frobnicate", cwd=tmp_path)
    assert result.returncode == 2
    assert "frobnicate" in result.stderr


def test_unknown_pass_is_one_error_line(tiny_model_path):
    folder = tiny_model_path.parent
    # Narrow: a message that wrapped would show up as several lines.
    result = cli(
        "optimize", tiny_model_path, "-o", "out.onnx", "-p", "cleanup,no-such-pass",
        cwd=folder, columns="60",
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error:")
    assert "no-such-pass" in line
    assert "hint:" in line
    for name in available_passes():
        assert name in line
    assert "Traceback" not in result.stderr
    assert not (folder / "out.onnx").exists()


def test_unknown_option(tiny_model_path):
    result = cli("optimize", tiny_model_path, "--no-such-option", cwd=tiny_model_path.parent)
    assert result.returncode == 2
    assert "--no-such-option" in result.stderr


def test_missing_input_file(tmp_path):
    result = cli("optimize", "missing.onnx", "-o", "out.onnx", "-p", "cleanup", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error:")
    assert "missing.onnx" in line
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("how", ["same-path", "hard-link"])
def test_output_equal_to_the_input_is_refused(tiny_model_path, how):
    folder = tiny_model_path.parent
    before = tiny_model_path.read_bytes()
    target = tiny_model_path
    if how == "hard-link":
        target = folder / "link.onnx"
        os.link(tiny_model_path, target)
    result = cli(
        "optimize", tiny_model_path, "-o", target, "-p", "cleanup", cwd=folder, columns="60"
    )
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error:")
    assert "overwrite" in line
    assert tiny_model_path.read_bytes() == before


def test_debug_shows_the_traceback(tmp_path):
    result = cli(
        "--debug", "optimize", "missing.onnx", "-o", "out.onnx", "-p", "cleanup", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "InputError" in result.stderr


# --- the acceptance flow ---------------------------------------------------------------------


def test_optimize_then_inspect(tiny_model_path):
    folder = tiny_model_path.parent
    result = cli(
        "optimize", tiny_model_path.name, "-o", "out.onnx", "-p", "cleanup",
        "--verify", "numeric", "--ledger", "l.json",
        cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote out.onnx" in result.stdout
    out = folder / "out.onnx"
    assert _node_count(out) < _node_count(tiny_model_path)

    ledger = json.loads((folder / "l.json").read_text())
    assert ledger["status"] == "ok"
    assert ledger["pipeline"] == "cleanup"
    (entry,) = ledger["passes"]
    assert entry["name"] == "cleanup"
    assert entry["status"] == "ok"
    assert entry["nodes_before"] == _node_count(tiny_model_path)
    assert entry["nodes_after"] == _node_count(out)
    assert entry["drift"]["finite"] is True
    assert entry["drift"]["rel_l2"] == 0.0  # dropping an Identity changes no output bit

    shown = cli("inspect", "out.onnx", cwd=folder)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^pipeline: cleanup$", shown.stdout, re.MULTILINE)

    as_json = cli("inspect", "out.onnx", "--json", cwd=folder)
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["pipeline"] == "cleanup"
    assert info["onnxforge_version"] == onnxforge.__version__
    assert info["nodes"] == _node_count(out)
    assert [i["name"] for i in info["inputs"]] == ["x"]
    assert info["cuda_provider_options"] is None
    assert "CUDA provider options" not in shown.stdout


def test_inspect_shows_the_cuda_options_a_pass_recorded(seed_cnn_path):
    folder = seed_cnn_path.parent
    result = cli(
        "optimize", seed_cnn_path.name, "-o", "half.onnx", "-p", "fp16{target=cuda}", cwd=folder
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = cli("inspect", "half.onnx", cwd=folder)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^CUDA provider options on --ep cuda: .*prefer_nhwc", shown.stdout, re.M)
    info = json.loads(cli("inspect", "half.onnx", "--json", cwd=folder).stdout)
    assert json.loads(info["cuda_provider_options"]) == {"fuse_conv_bias": "1", "prefer_nhwc": "1"}


@pytest.mark.parametrize(
    ("target", "pipeline"),
    [
        ("cpu", "fold-constants,cleanup,fuse"),
        ("cuda", "fold-constants,cleanup,fuse{target=cuda},fp16{target=cuda},cuda-layout"),
    ],
)
def test_optimize_without_a_pipeline_starts_from_the_target_preset(
    tiny_model_path, target, pipeline
):
    folder = tiny_model_path.parent
    result = cli("optimize", tiny_model_path.name, "-o", f"{target}.onnx", "--target", target,
                 "--ledger", f"{target}.json", cwd=folder)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / f"{target}.json").read_text())["pipeline"] == pipeline
    shown = json.loads(cli("inspect", f"{target}.onnx", "--json", cwd=folder).stdout)
    assert shown["pipeline"] == pipeline


def test_optimize_unknown_target_is_a_usage_error(tiny_model_path):
    folder = tiny_model_path.parent
    result = cli("optimize", tiny_model_path.name, "-o", "x.onnx", "--target", "tpu", cwd=folder)
    assert result.returncode == 2
    assert "use cpu or cuda" in result.stderr
    assert not (folder / "x.onnx").exists()


def test_bench_cuda_graph_on_the_cpu_is_a_clear_error(tiny_model_path):
    result = cli("bench", tiny_model_path.name, "--cuda-graph", cwd=tiny_model_path.parent)
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error: CUDA graphs need the cuda execution provider")


@pytest.fixture(scope="module")
def failed_verification(tmp_path_factory, make_tiny_model):
    """One run of a pipeline whose second pass claims to be exact but changes the math."""
    folder = tmp_path_factory.mktemp("failed-verification")
    model_path = onnxforge.save(make_tiny_model(), folder / "tiny.onnx")
    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
    result = cli(
        "--plugin", PLUGIN_MODULE,
        "optimize", model_path.name, "-o", "out.onnx", "-p", "cleanup,shift-bias",
        "--verify", "numeric", "--ledger", "l.json", "--reproducer", "repro",
        cwd=folder, pythonpath=plugins,
    )  # fmt: skip
    return folder, result


def _the_error_line(result: subprocess.CompletedProcess) -> str:
    (line,) = [line for line in _error_lines(result) if line.startswith("error:")]
    return line


def test_a_wrong_plugin_pass_fails_numeric_verification(failed_verification):
    folder, result = failed_verification
    assert result.returncode == 1, result.stderr
    line = _the_error_line(result)
    assert "'shift-bias'" in line
    assert "Traceback" not in result.stderr
    assert not (folder / "out.onnx").exists()
    ledger = json.loads((folder / "l.json").read_text())
    assert ledger["status"] == "failed"
    assert [(p["name"], p["status"]) for p in ledger["passes"]] == [
        ("cleanup", "ok"),
        ("shift-bias", "failed"),
    ]


def test_reproducer_is_written_when_verification_fails(failed_verification, tiny_bias):
    folder, result = failed_verification
    assert result.returncode == 1, result.stderr
    repro = folder / "repro"
    saved = sorted(repro.glob("*.onnx")) if repro.exists() else []
    assert len(saved) == 1
    model = onnxforge.load(saved[0])
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_verification_error_names_the_passes_before(failed_verification):
    line = _the_error_line(failed_verification[1])
    assert "(first pass)" not in line
    assert "after cleanup" in line


def test_verification_hint_names_only_existing_options(failed_verification):
    hint = _the_error_line(failed_verification[1]).split("hint:", 1)[1]
    options = set(re.findall(r"--[a-z][a-z-]*", hint))
    assert options, hint
    known = {*SUBCOMMAND_OPTIONS["optimize"], *GLOBAL_OPTIONS, "--help"}
    assert options <= known


def test_reproducer_is_written_when_a_pass_crashes(tiny_model_path, plugin_dir, tiny_bias):
    folder = tiny_model_path.parent
    result = cli(
        "--plugin", PLUGIN_MODULE,
        "optimize", tiny_model_path.name, "-o", "out.onnx", "-p", "cleanup,crash",
        "--verify", "numeric", "--reproducer", "repro",
        cwd=folder, pythonpath=plugin_dir,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = _the_error_line(result)
    assert "'crash'" in line and "boom" in line
    (saved,) = sorted((folder / "repro").glob("*.onnx"))
    assert str(saved.relative_to(folder)) in line
    # The model as it was before the crashing pass: cleanup had run, the bias is untouched.
    model = onnxforge.load(saved)
    assert model.metadata_props["onnxforge.reproduce"] == "crash"
    assert len(list(model.graph)) == _node_count(tiny_model_path) - 1
    np.testing.assert_array_equal(model.graph.initializers["bias"].const_value.numpy(), tiny_bias)


def test_reproducer_of_a_model_with_external_data_loads(tiny_external_path, plugin_dir):
    folder = tiny_external_path.parent
    result = cli(
        "--plugin", PLUGIN_MODULE,
        "optimize", tiny_external_path.name, "-o", "out.onnx", "-p", "crash",
        "--reproducer", "repro",
        cwd=folder, pythonpath=plugin_dir,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    (saved,) = sorted((folder / "repro").glob("*.onnx"))
    model = onnxforge.load(saved)
    model.graph.initializers["bias"].const_value.numpy()


# --- passes, run, export, demo ---------------------------------------------------------------


def test_passes_table(tmp_path):
    result = cli("passes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # One block of text per pass: its row plus any continuation lines of wrapped cells.
    rows: dict[str, str] = {}
    name = None
    for line in result.stdout.splitlines():
        if "│" not in line:
            continue
        name = line.split("│")[1].strip() or name
        rows[name] = rows.get(name, "") + line
    for name, cls in available_passes().items():
        assert name in rows
        assert str(cls.semantics) in rows[name]
        for option in cls.options():
            assert option.name in rows[name]
    assert {"cleanup", "collapse-relu"} <= set(rows)


def test_passes_json(tmp_path):
    result = cli("passes", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"cleanup", "collapse-relu"} <= set(listed)
    for name, cls in available_passes().items():
        assert listed[name]["semantics"] == str(cls.semantics)
        assert listed[name]["summary"] == cls.summary
        assert list(listed[name]["options"]) == [o.name for o in cls.options()]


def test_run_saves_the_outputs(tiny_model_path, tiny_bias, tiny_reference):
    folder = tiny_model_path.parent
    x = np.random.default_rng(5).standard_normal((3, tiny_bias.size)).astype(np.float32)
    np.savez(folder / "in.npz", x=x)
    result = cli("run", tiny_model_path.name, "--inputs", "in.npz", "--save", "out.npz", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "wrote out.npz" in result.stdout
    with np.load(folder / "out.npz") as outputs:
        assert outputs.files == ["y"]
        np.testing.assert_array_equal(outputs["y"], tiny_reference(x, tiny_bias))


def test_run_with_random_inputs_at_a_batch(tiny_model_path, tiny_bias):
    folder = tiny_model_path.parent
    result = cli("run", tiny_model_path.name, "--batch", "4", "--save", "out.npz", cwd=folder)
    assert result.returncode == 0, result.stderr
    with np.load(folder / "out.npz") as outputs:
        assert outputs["y"].shape == (4, tiny_bias.size)


@pytest.mark.slow
def test_export(tmp_path):
    result = cli("export", "seed-cnn", "-o", "x.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote x.onnx" in result.stdout
    model = onnxforge.load(tmp_path / "x.onnx")
    assert not isinstance(model.graph.inputs[0].shape[0], int)  # the batch stays symbolic
    assert model.metadata_props["onnxforge.version"] == onnxforge.__version__


@pytest.mark.slow
def test_demo(tmp_path):
    from onnxforge.demo import DEMO_SAMPLE
    from onnxforge.io import PIPELINE_KEY
    from onnxforge.presets import DEFAULT_PIPELINE

    result = cli("demo", "--out", "demo-out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo-out"
    exported, optimized = out / f"{DEMO_SAMPLE}.onnx", out / f"{DEMO_SAMPLE}.optimized.onnx"
    assert exported.is_file() and optimized.is_file()
    assert onnxforge.load(optimized).metadata_props[PIPELINE_KEY] == DEFAULT_PIPELINE
    for name in DEFAULT_PIPELINE.split(","):
        assert re.search(rf"│\s*{re.escape(name)}\s*│", result.stdout), name
    assert "wrote" in result.stdout


def test_bench_compares_two_models_in_one_table(tiny_model_path, tmp_path):
    second = tmp_path / "second.onnx"
    second.write_bytes(tiny_model_path.read_bytes())
    result = cli(
        "bench",
        tiny_model_path,
        second,
        "--runs",
        "20",
        "--batch",
        "3",
        "--json",
        "b.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "tiny.onnx" in result.stdout and "second.onnx" in result.stdout
    assert "1.00x" in result.stdout  # the first model's ratio against itself
    data = json.loads((tmp_path / "b.json").read_text())
    assert [pathlib.Path(m["model"]).name for m in data["models"]] == [
        tiny_model_path.name,
        "second.onnx",
    ]
    for entry in data["models"]:
        latency = entry["latency"]
        assert latency["runs"] == 20 and latency["batch"] == 3
        assert latency["p50_ms"] <= latency["p99_ms"]


def test_bench_load_test_json_has_unbatched_and_batched(tiny_model_path, tmp_path):
    result = cli(
        "bench",
        tiny_model_path,
        "--concurrency",
        "4",
        "--max-batch",
        "4",
        "--requests",
        "5",
        "--json",
        "load.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for mode in ("unbatched", "batched", "direct"):
        assert mode in result.stdout
    (entry,) = json.loads((tmp_path / "load.json").read_text())["models"]
    for mode in ("unbatched", "batched"):
        assert set(entry[mode]) >= {"throughput", "p50_ms", "p99_ms"}
        assert entry[mode]["requests"] == 20
    assert entry["concurrency"] == 4
    assert entry["instances"] == 1 and entry["max_batch"] == 4


def test_bench_load_test_with_instances(tiny_model_path, tmp_path):
    result = cli(
        "bench",
        tiny_model_path,
        "--concurrency",
        "6",
        "--instances",
        "2",
        "--requests",
        "4",
        "--json",
        "load.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((tmp_path / "load.json").read_text())["models"]
    assert entry["instances"] == 2
    assert entry["max_batch"] == 3  # each instance's share of 6 clients
    assert entry["batched"]["requests"] == 24
    assert entry["batched"]["mean_batch"] <= 3


def test_bench_instances_without_a_load_test_is_a_usage_error(tiny_model_path, tmp_path):
    result = cli("bench", tiny_model_path, "--instances", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "--concurrency" in result.stderr


def test_bench_bad_shape_is_a_usage_error(tiny_model_path, tmp_path):
    result = cli("bench", tiny_model_path, "--shape", "sequence", cwd=tmp_path)
    assert result.returncode == 2
    assert _error_lines(result) == [line for line in _error_lines(result) if "--shape" in line]


def test_explain_lists_near_misses_with_reasons(tmp_path):
    import onnx_ir as ir

    model = ir.from_onnx_text(
        """<ir_version: 10, opset_import: ["" : 20]>
        g (float[1,2,4,4] x, float[1,3,4,4] z) => (float[1,3,4,4] y)
            <float[3,2,1,1] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> {
            c = Conv(x, w)
            y = Add(c, z)
        }"""
    )
    path = onnxforge.save(model, tmp_path / "conv_add.onnx")
    result = cli(
        "optimize", path, "-o", "out.onnx", "-p", "fuse", "--explain", "fuse", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "near-misses of fuse" in result.stdout
    assert "FoldAddIntoConvBias" in result.stdout and "not a constant" in result.stdout


def test_explain_of_a_pass_not_in_the_pipeline(tiny_model_path, tmp_path):
    result = cli(
        "optimize",
        tiny_model_path,
        "-o",
        "out.onnx",
        "-p",
        "cleanup",
        "--explain",
        "fuse",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "not in the pipeline" in result.stderr

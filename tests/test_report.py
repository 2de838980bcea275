"""The HTML report: one self-contained file whose script draws the plots, checked in Chromium.

The page is rendered by headless Chromium (``--dump-dom`` after the script ran) and the SVG it
drew is read back: a point per distinct outcome at finite coordinates, Pareto points marked as
the table marks them, a bar per pass of the fastest ordering, op bars in proportion to the op
counts. CI installs Chromium (``.ci/run``); without it the browser test is skipped.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import os
import re
import shutil
import subprocess

import onnx_ir as ir
import pytest
from test_compare import FAST, build_tiny_cnn, tiny_inputs

from onnxforge.compare import ORIGINAL, CompareResult, compare
from onnxforge.passes import Pass, PassResult, Semantics
from onnxforge.passes import registry as _registry
from onnxforge.report import render_report, report_data, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]


class FailingPass(Pass):
    """Raises, so that the report has a failed row to show."""

    name = "test-report-crash"
    summary = "Raise."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        raise RuntimeError("crashed on purpose")


@pytest.fixture(scope="module")
def result() -> CompareResult:
    _registry.register(FailingPass)
    try:
        return compare(
            build_tiny_cnn(),
            [
                "fold-constants,cleanup,fuse",
                "fuse,cleanup",
                "cleanup",
                "cleanup,cleanup",  # the same model as cleanup alone: one point for both
                "cleanup,test-report-crash",
            ],
            inputs=tiny_inputs(),
            **FAST,
        )
    finally:
        _registry.unregister(FailingPass.name)


def test_report_is_one_self_contained_file(result: CompareResult, tmp_path) -> None:
    path = write_report(result, tmp_path / "report.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing is fetched: no external scripts, styles, images or fonts
    assert not re.search(r"<script[^>]+src=|<link|<img|@import|url\(", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    match = re.search(r'<script type="application/json" id="compare-data">(.*?)</script>', page)
    data = json.loads(match.group(1))
    assert data == json.loads(json.dumps(report_data(result), default=str))
    # a point per distinct model, listing the orderings that produce it
    by_pipeline = {r.pipeline: r for r in result.rows if r.status == "ok"}
    by_pipeline[ORIGINAL] = result.original
    assert sorted(q for p in data["points"] for q in p["pipelines"]) == sorted(by_pipeline)
    hashes = [{by_pipeline[q].model_hash for q in p["pipelines"]} for p in data["points"]]
    assert all(len(h) == 1 for h in hashes) and len({h.pop() for h in hashes}) == len(hashes)
    assert data["points"][0]["pipelines"][0] == ORIGINAL and data["points"][0]["original"]
    assert ["cleanup", "cleanup,cleanup"] in [sorted(p["pipelines"]) for p in data["points"]]
    assert [c["pass"] for c in data["contributions"]] == result.best.split(",")
    # every row is in the table, the failed one with its status
    for row in result.rows:
        assert f"<td>{row.pipeline}</td>" in page
    assert "failed: test-report-crash" in page


def test_text_that_could_close_the_script_is_escaped(result: CompareResult) -> None:
    hostile = dataclasses.replace(result, model="</script><script>alert(1)</script>")
    page = render_report(hostile)
    assert "<script>alert(1)" not in page
    assert page.count("</script>") == 2  # the data block's and the drawing script's
    data = re.search(r'id="compare-data">(.*?)</script>', page).group(1)
    assert json.loads(data)["model"] == hostile.model


# --- in a browser --------------------------------------------------------------------------------


class _Elements(html.parser.HTMLParser):
    """Every start tag of a document, with its attributes and the <svg> it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self._plot: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self._plot = attributes.get("data-plot")
        self.elements.append((tag, attributes, self._plot))

    def handle_endtag(self, tag) -> None:
        if tag == "svg":
            self._plot = None

    def find(self, plot: str | None = None, css: str | None = None, tag: str | None = None):
        return [
            attributes
            for t, attributes, p in self.elements
            if (plot is None or p == plot)
            and (tag is None or t == tag)
            and (css is None or css in attributes.get("class", "").split())
        ]


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _dump_dom(page, tmp_path) -> str:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here (CI installs it: apt-get install chromium)")
    profile = tmp_path / "profile"
    profile.mkdir()
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _inside(attributes: dict[str, str], width: float, height: float, *keys: str) -> bool:
    return all(0 <= float(attributes[k]) <= (width if k in ("x", "cx") else height) for k in keys)


def test_chromium_draws_the_plots(result: CompareResult, tmp_path) -> None:
    page = write_report(result, tmp_path / "report.html")
    dom = _Elements()
    dom.feed(_dump_dom(page, tmp_path))
    assert dom.find(tag="body")[0].get("data-drawn") == "true"  # the script ran to its end
    plots = {a["data-plot"]: a for a in dom.find(tag="svg", css="plot")}
    assert set(plots) == {"pareto", "contributions", "ops"}

    # the Pareto plot: a mark per distinct model, where the data puts it, marked as the table
    ok = [r for r in result.rows if r.status == "ok"]
    points = dom.find("pareto", css="point")
    expected = report_data(result)["points"]
    assert [p["data-pipeline"] for p in points] == [p["pipeline"] for p in expected]
    assert sum(int(p["data-orderings"]) for p in points) == len(ok) + 1
    width, height = (float(v) for v in plots["pareto"]["viewbox"].split()[2:])
    rows = {r.pipeline: r for r in ok} | {ORIGINAL: result.original}
    for mark in points:
        row = rows[mark["data-pipeline"]]
        assert ("pareto" in mark["class"].split()) is row.pareto
        assert ("original" in mark["class"].split()) is (row is result.original)
        assert _inside(mark, width, height, *(("cx", "cy") if "cx" in mark else ("x", "y")))
    circles = sorted(
        (m for m in points if "cx" in m), key=lambda m: rows[m["data-pipeline"]].latency_ms
    )
    xs = [float(m["cx"]) for m in circles]
    assert xs == sorted(xs)
    if len({rows[m["data-pipeline"]].latency_ms for m in circles}) > 1:
        assert xs[0] < xs[-1]
    if sum(p["pareto"] for p in expected) > 1:  # two distinct models on the front
        assert dom.find("pareto", css="front")  # the front is drawn as a line

    # the contributions: a bar per pass of the fastest ordering, in order, inside the plot
    bars = [a for a in dom.find("contributions", css="bar") if "data-pass" in a]
    assert [b["data-pass"] for b in bars] == result.best.split(",")
    width, height = (float(v) for v in plots["contributions"]["viewbox"].split()[2:])
    assert all(_inside(b, width, height, "x", "y") and float(b["height"]) >= 1 for b in bars)

    # the op histograms: a bar per op and series, lengths in proportion to the counts
    before, after = result.original.ops, result.row(result.best).ops
    op_bars = {
        (b["data-op"], b["data-series"]): float(b["width"])
        for b in dom.find("ops", css="bar")
        if "data-op" in b
    }
    assert set(op_bars) == {(op, s) for op in set(before) | set(after) for s in ("before", "after")}
    per_node = op_bars[("Conv", "before")] / before["Conv"]
    for (op, series), bar_width in op_bars.items():
        count = (before if series == "before" else after).get(op, 0)
        assert bar_width == pytest.approx(count * per_node, abs=1e-6)
    assert per_node > 0 and max(op_bars.values()) <= float(plots["ops"]["width"])

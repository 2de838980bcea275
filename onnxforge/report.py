"""The HTML report of a comparison: one self-contained file, plots drawn by the page itself.

Three plots, drawn as SVG by a small script inside the page (no library, nothing fetched):
latency against the accuracy metric with the Pareto front, the per-pass contributions of the
fastest ordering (a waterfall from the original's latency to its own), and the op histograms
of the original and of that ordering's model. Then the table, as the terminal shows it. The
figures travel as JSON inside the page, so the file is also a record of the comparison.
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
from typing import Any

from onnxforge import __version__
from onnxforge.compare import ORIGINAL, CompareResult, CompareRow
from onnxforge.io import atomic_write_text

__all__ = ["render_report", "write_report", "report_data"]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _point(row: CompareRow, *, original: bool = False) -> dict[str, Any]:
    return {
        "pipeline": ORIGINAL if original else row.pipeline,
        "pipelines": [ORIGINAL if original else row.pipeline],
        "latency_ms": row.latency_ms,
        "metric": _finite(row.metric),
        "speedup": row.speedup,
        "pareto": row.pareto,
        "original": original,
        "model": row.model,
        "nodes": row.nodes,
        "size_bytes": row.size_bytes,
    }


def report_data(result: CompareResult) -> dict[str, Any]:
    """What the page draws: points, contributions, op histograms, and the table's rows."""
    ok = [r for r in result.rows if r.status == "ok" and r.latency_ms is not None]
    best = result.row(result.best) if result.best is not None else None
    # one point per distinct model; rows that leave the model as it was share the original's
    points = {result.original.model_hash: _point(result.original, original=True)}
    for row in ok:
        if row.model_hash in points:
            points[row.model_hash]["pipelines"].append(row.pipeline)
        else:
            points[row.model_hash] = _point(row)
    return {
        "title": f"onnxforge compare: {result.model}",
        "model": result.model,
        "ep": result.ep,
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "batch": result.batch,
        "inputs_rows": result.inputs_rows,
        "executor": result.executor,
        "jobs": result.jobs,
        "best": result.best,
        "original_latency_ms": result.original.latency_ms,
        "points": list(points.values()),
        "contributions": [
            {k: entry[k] for k in ("index", "pass", "latency_ms", "delta_latency_ms")}
            | {"delta_nodes": entry["delta_nodes"], "delta_metric": entry["delta_metric"]}
            for entry in result.contributions
        ],
        "ops_before": result.original.ops or {},
        "ops_after": (best.ops or {}) if best is not None else {},
        "summary": {
            "orderings": len(result.rows),
            "failed": sum(r.status != "ok" for r in result.rows),
            "pass_runs": result.pass_runs,
            "pass_runs_unshared": result.pass_runs_unshared,
            "distinct_models": result.distinct_models,
            "wall_s": result.wall_s,
        },
    }


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return {"cosine": f"{value:.6f}", "top1": f"{value:.4f}"}.get(metric, f"{value:.2e}")


def _table(result: CompareResult) -> str:
    head = (
        "<tr><th>#</th><th>pipeline</th><th>model</th><th>status</th><th>p50 ms</th>"
        "<th>speedup</th><th>samples/s</th><th>size (bytes)</th><th>nodes</th>"
        f"<th>{html.escape(result.metric)}</th><th>optimize s</th><th>Pareto</th></tr>"
    )
    lines = []
    for row, rank, name in [(result.original, "", ORIGINAL)] + [
        (r, str(r.rank or ""), r.pipeline) for r in result.rows
    ]:
        ok = row.status == "ok"
        status = row.status if ok else f"{row.status}: {row.failed_pass or 'measuring'}"
        cells = [
            rank,
            name,
            row.model or "-",
            status,
            f"{row.latency_ms:.4g}" if ok and row.latency_ms is not None else "-",
            f"{row.speedup:.2f}x" if ok and row.speedup else "-",
            f"{row.throughput:.1f}" if ok and row.throughput is not None else "-",
            f"{row.size_bytes:,}" if row.size_bytes is not None else "-",
            str(row.nodes) if row.nodes is not None else "-",
            _metric_text(row.metric, result.metric) if ok else "-",
            f"{row.optimize_s:.2f}" if row.optimize_s is not None else "-",
            "&#9733;" if row.pareto else "",
        ]
        title = f' title="{html.escape(row.error)}"' if row.error else ""
        css = ' class="pareto"' if row.pareto else (' class="failed"' if not ok else "")
        tds = "".join(
            f"<td>{cell}</td>" if i == len(cells) - 1 else f"<td>{html.escape(cell)}</td>"
            for i, cell in enumerate(cells)
        )
        lines.append(f"<tr{css}{title}>{tds}</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(lines)}</tbody></table>"


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; padding: 0 16px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.meta { color: #555; }
svg.plot { display: block; background: #fff; border: 1px solid #ddd; margin: 8px 0; }
svg .axis line, svg .axis path { stroke: #444; } svg .grid line { stroke: #eee; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .title { font-size: 12px; font-weight: 600; }
svg .point { fill: #8aa4c8; stroke: #33557f; } svg .point.pareto { fill: #e4572e; stroke: #8c2a10; }
svg .point.original { fill: #fff; stroke: #000; stroke-width: 2; }
svg .front { fill: none; stroke: #e4572e; stroke-dasharray: 4 3; }
svg .bar.faster { fill: #3b8b5a; } svg .bar.slower { fill: #c0392b; }
svg .bar.total { fill: #8aa4c8; }
svg .bar.before { fill: #b9b9b9; } svg .bar.after { fill: #33557f; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: right; }
th:nth-child(2), td:nth-child(2), td:nth-child(4) { text-align: left; }
tr.pareto td { background: #fff3ee; } tr.failed td { color: #999; }
.note { color: #666; font-size: 12px; }
"""

# Draws the plots from the JSON in #compare-data. Plain DOM + SVG: nothing is loaded.
_SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("compare-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  function el(tag, attrs, parent, text) {
    const node = document.createElementNS(NS, tag);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function ticks(lo, hi, count) {
    if (!(hi > lo)) { const pad = Math.abs(lo) * 0.01 || 1; lo -= pad; hi += pad; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    const start = Math.floor(lo / step) * step, end = Math.ceil(hi / step) * step;
    const values = [];
    for (let v = start; v <= end + step / 2; v += step) values.push(Number(v.toPrecision(12)));
    return { lo: start, hi: end, step: step, values: values };
  }
  function fmt(value, step) {
    const digits = Math.min(8, Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
    return value.toFixed(digits);
  }
  function frame(host, name, width, height, margin) {
    const svg = el("svg", { class: "plot", "data-plot": name, width: width, height: height,
                            viewBox: "0 0 " + width + " " + height }, host);
    return { svg: svg, x0: margin.l, x1: width - margin.r, y0: height - margin.b, y1: margin.t };
  }
  function axes(f, xt, yt, xTitle, yTitle, xScale, yScale) {
    const grid = el("g", { class: "grid" }, f.svg), axis = el("g", { class: "axis" }, f.svg);
    if (xt) xt.values.forEach(function (v) {
      const x = xScale(v);
      el("line", { x1: x, x2: x, y1: f.y0, y2: f.y1 }, grid);
      el("text", { x: x, y: f.y0 + 16, "text-anchor": "middle" }, axis, fmt(v, xt.step));
    });
    if (yt) yt.values.forEach(function (v) {
      const y = yScale(v);
      el("line", { x1: f.x0, x2: f.x1, y1: y, y2: y }, grid);
      el("text", { x: f.x0 - 6, y: y + 4, "text-anchor": "end" }, axis, fmt(v, yt.step));
    });
    el("line", { x1: f.x0, x2: f.x1, y1: f.y0, y2: f.y0 }, axis);
    el("line", { x1: f.x0, x2: f.x0, y1: f.y0, y2: f.y1 }, axis);
    if (xTitle) el("text", { class: "title", x: (f.x0 + f.x1) / 2, y: f.y0 + 38,
                             "text-anchor": "middle" }, f.svg, xTitle);
    if (yTitle) el("text", { class: "title", x: 14, y: (f.y0 + f.y1) / 2,
                             transform: "rotate(-90 14 " + (f.y0 + f.y1) / 2 + ")",
                             "text-anchor": "middle" }, f.svg, yTitle);
  }
  function linear(domain, range) {
    return function (v) {
      return range[0] + (v - domain[0]) / (domain[1] - domain[0]) * (range[1] - range[0]);
    };
  }

  function pareto(host) {
    const points = data.points.filter(function (p) { return p.metric !== null; });
    const f = frame(host, "pareto", 760, 440, { l: 86, r: 24, t: 16, b: 52 });
    const xt = ticks(Math.min.apply(null, points.map(function (p) { return p.latency_ms; })),
                     Math.max.apply(null, points.map(function (p) { return p.latency_ms; })), 6);
    const yt = ticks(Math.min.apply(null, points.map(function (p) { return p.metric; })),
                     Math.max.apply(null, points.map(function (p) { return p.metric; })), 6);
    const x = linear([xt.lo, xt.hi], [f.x0, f.x1]), y = linear([yt.lo, yt.hi], [f.y0, f.y1]);
    axes(f, xt, yt, "p50 latency, ms (batch " + data.batch + ")",
         data.metric + (data.higher_is_better ? " (higher is better)" : " (lower is better)"),
         x, y);
    const front = points.filter(function (p) { return p.pareto; })
                        .sort(function (a, b) { return a.latency_ms - b.latency_ms; });
    if (front.length > 1) {
      let path = "";
      front.forEach(function (p, i) {
        path += (i ? " H " + x(p.latency_ms) + " V " : "M " + x(p.latency_ms) + " ")
              + y(p.metric);
      });
      el("path", { class: "front", d: path }, f.svg);
    }
    const layer = el("g", { class: "points" }, f.svg);
    const labels = [];
    points.forEach(function (p) {
      const cx = x(p.latency_ms), cy = y(p.metric);
      const css = "point" + (p.pareto ? " pareto" : "") + (p.original ? " original" : "");
      const shape = p.original
        ? el("rect", { class: css, x: cx - 6, y: cy - 6, width: 12, height: 12,
                       transform: "rotate(45 " + cx + " " + cy + ")" }, layer)
        : el("circle", { class: css, cx: cx, cy: cy, r: p.pareto ? 6 : 4.5 }, layer);
      shape.setAttribute("data-pipeline", p.pipeline);
      shape.setAttribute("data-orderings", p.pipelines.length);
      el("title", {}, shape, (p.model ? "model " + p.model + ": " : "") + p.pipelines.join("\n")
         + "\n" + p.latency_ms.toPrecision(4) + " ms, " + data.metric + " " + p.metric
         + (p.speedup ? ", " + p.speedup.toFixed(2) + "x" : ""));
      const more = p.pipelines.length > 1 ? " (+" + (p.pipelines.length - 1) + ")" : "";
      labels.push({ cx: cx, cy: cy, rank: p.original ? 0 : p.pareto ? 1 : 2,
                    text: p.original ? p.pipeline
                      : p.pareto ? (p.model ? p.model + ": " : "") + p.pipeline + more
                      : p.model || "" });
    });
    // labels where they fit: the original's and the front's first, then the others' letters;
    // a label that would overlap one already placed moves round its point, or is left out
    // (the point's tooltip still names it)
    const placed = [];
    labels.sort(function (a, b) { return a.rank - b.rank; }).forEach(function (l) {
      const w = 6.2 * l.text.length, h = 12;
      const spots = [[9, -8], [9, 14], [-9 - w, -8], [-9 - w, 14]];
      for (let i = 0; i < spots.length; i++) {
        const x0 = l.cx + spots[i][0], y0 = l.cy + spots[i][1] - h;
        const box = { x0: x0, y0: y0, x1: x0 + w, y1: y0 + h };
        const clash = placed.some(function (o) {
          return box.x0 < o.x1 && o.x0 < box.x1 && box.y0 < o.y1 && o.y0 < box.y1;
        });
        if (!clash && box.x0 >= 0 && box.y0 >= 2 && box.x1 <= f.x1 + 20) {
          placed.push(box);
          el("text", { class: "label", x: x0, y: y0 + h - 2 }, f.svg, l.text);
          return;
        }
      }
    });
  }

  function contributions(host) {
    const steps = data.contributions.filter(function (c) { return c.latency_ms !== null; });
    if (!steps.length || data.original_latency_ms === null) {
      host.appendChild(document.createTextNode("no ordering succeeded"));
      return;
    }
    const bars = [{ label: "original", lo: 0, hi: data.original_latency_ms, css: "total" }];
    let previous = data.original_latency_ms;
    steps.forEach(function (c) {
      bars.push({ label: "#" + c.index + " " + c.pass, lo: Math.min(previous, c.latency_ms),
                  hi: Math.max(previous, c.latency_ms), pass: c.pass,
                  css: c.latency_ms <= previous ? "faster" : "slower",
                  note: (c.delta_latency_ms >= 0 ? "+" : "") + c.delta_latency_ms.toFixed(4)
                        + " ms, nodes " + (c.delta_nodes >= 0 ? "+" : "") + c.delta_nodes });
      previous = c.latency_ms;
    });
    bars.push({ label: "result", lo: 0, hi: previous, css: "total" });
    const f = frame(host, "contributions", 760, 360, { l: 86, r: 24, t: 16, b: 92 });
    const yt = ticks(0, Math.max.apply(null, bars.map(function (b) { return b.hi; })), 5);
    const y = linear([yt.lo, yt.hi], [f.y0, f.y1]);
    axes(f, null, yt, null, "p50 latency, ms", null, y);
    const slot = (f.x1 - f.x0) / bars.length;
    bars.forEach(function (b, i) {
      const left = f.x0 + i * slot + slot * 0.15, top = y(b.hi);
      const height = Math.max(1, y(b.lo) - y(b.hi));
      const rect = el("rect", { class: "bar " + b.css, x: left, y: top, width: slot * 0.7,
                                height: height }, f.svg);
      if (b.pass !== undefined) rect.setAttribute("data-pass", b.pass);
      el("title", {}, rect, b.label + (b.note ? ": " + b.note : ": " + b.hi.toFixed(4) + " ms"));
      const cx = left + slot * 0.35;
      el("text", { x: cx, y: f.y0 + 14, "text-anchor": "end",
                   transform: "rotate(-35 " + cx + " " + (f.y0 + 14) + ")" }, f.svg, b.label);
    });
  }

  function ops(host) {
    const before = data.ops_before, after = data.ops_after;
    const names = Object.keys(Object.assign({}, before, after)).sort(function (a, b) {
      return Math.max(after[b] || 0, before[b] || 0) - Math.max(after[a] || 0, before[a] || 0)
             || (a < b ? -1 : 1);
    });
    const row = 22, height = 40 + names.length * row + 36;
    const longest = Math.max.apply(null, names.map(function (n) { return n.length; }).concat([4]));
    const f = frame(host, "ops", 760, height,
                    { l: Math.min(340, 20 + 6.4 * longest), r: 40, t: 28, b: 44 });
    const xt = ticks(0, Math.max.apply(null, names.map(function (n) {
      return Math.max(before[n] || 0, after[n] || 0); }).concat([1])), 5);
    const x = linear([xt.lo, xt.hi], [f.x0, f.x1]);
    axes(f, xt, null, "nodes", null, x, null);
    el("rect", { class: "bar before legend", x: f.x0, y: 6, width: 12, height: 10 }, f.svg);
    el("text", { x: f.x0 + 16, y: 15 }, f.svg, "original");
    el("rect", { class: "bar after legend", x: f.x0 + 90, y: 6, width: 12, height: 10 }, f.svg);
    el("text", { x: f.x0 + 106, y: 15 }, f.svg, "fastest ordering: " + (data.best || "-"));
    names.forEach(function (name, i) {
      const top = f.y1 + 8 + i * row;
      el("text", { x: f.x0 - 8, y: top + 12, "text-anchor": "end" }, f.svg, name);
      [["before", before[name] || 0, 0], ["after", after[name] || 0, 9]].forEach(function (s) {
        const rect = el("rect", { class: "bar " + s[0], x: f.x0, y: top + s[2],
                                  width: Math.max(0, x(s[1]) - f.x0), height: 8 }, f.svg);
        rect.setAttribute("data-op", name);
        rect.setAttribute("data-series", s[0]);
        el("title", {}, rect, name + ": " + s[1] + " (" + s[0] + ")");
        el("text", { x: x(s[1]) + 4, y: top + s[2] + 8 }, f.svg, String(s[1]));
      });
    });
  }

  pareto(document.getElementById("pareto"));
  contributions(document.getElementById("contributions"));
  ops(document.getElementById("ops"));
  document.body.setAttribute("data-drawn", "true");
})();
"""


def _json_for_script(data: Any) -> str:
    # Inside <script>, "</" would end the element early: escape it (and the HTML-significant
    # characters, for good measure) the way JSON allows.
    text = json.dumps(data, default=str, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(result: CompareResult) -> str:
    """The report as one HTML document: styles, data and the drawing script all inline."""
    data = report_data(result)
    summary = data["summary"]
    best = result.row(result.best) if result.best is not None else None
    fastest = (
        f"fastest: <b>{html.escape(result.best)}</b>, {best.speedup:.2f}x the original's "
        f"p50, {html.escape(result.metric)} {_metric_text(best.metric, result.metric)}"
        if best is not None and best.speedup
        else "no ordering succeeded"
    )
    failed = f", {summary['failed']} failed" if summary["failed"] else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="onnxforge {html.escape(__version__)}">
<title>{html.escape(data["title"])}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(data["title"])}</h1>
<p class="meta">{summary["orderings"]} orderings{failed} on {html.escape(result.ep)},
latency at batch {result.batch}, {html.escape(result.metric)} on {result.inputs_rows} rows;
{summary["pass_runs"]} passes applied for the {summary["pass_runs_unshared"]} in the orderings
(common prefixes ran once); {summary["distinct_models"]} distinct models;
{summary["wall_s"]:.1f} s on {html.escape(result.executor)} with {result.jobs} job(s).<br>
{fastest}.</p>
<h2>Latency against {html.escape(result.metric)}: the Pareto front</h2>
<p class="note">Each point is a distinct model; the orderings that produce it share it (a
letter per model, as in the table; hover a point for its orderings). Red points are
Pareto-optimal: no other row is at least as fast and at least as accurate. The square is the
original model.</p>
<div id="pareto"></div>
<h2>Per-pass contributions of the fastest ordering</h2>
<p class="note">From the original's p50 latency, each pass's step to the next prefix's
(green: faster, red: slower), measured by replaying the ordering with every prefix
benchmarked.</p>
<div id="contributions"></div>
<h2>Op histograms before and after</h2>
<div id="ops"></div>
<h2>All orderings</h2>
<p class="note">Ranked by p50 latency; rows with one model letter produce the identical model
(same bytes).</p>
{_table(result)}
<script type="application/json" id="compare-data">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_report(result: CompareResult, path: str | os.PathLike[str]) -> pathlib.Path:
    """Write the report to ``path`` atomically; returns the path."""
    return atomic_write_text(path, render_report(result))

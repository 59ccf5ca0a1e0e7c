"""OUT/report.html: one self-contained page (tables, inline PNG plots, audio linked by relative
path; no scripts or external resources) that opens from disk in any browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure

from serec.fileio import write_text_atomic
from serec.quality import METRICS
from serec.routing import ENHANCED_DIR, rec_folder_name
from serec.schema import (
    HEADLINE_METRICS,
    RECOMMENDER_JSON,
    read_evaluation,
    read_recommendations,
    read_strategies,
    read_summary,
)
from serec.strategies import read_enhancement_scores, verdict

REPORT_HTML = "report.html"
DEFAULT_LISTENING_ROWS = 40

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
img { max-width: 100%; } audio { width: 170px; height: 30px; }
.wide { overflow-x: auto; } dl { font-size: 0.9em; } dt { font-weight: bold; float: left; margin-right: 0.5em; }
.note { color: #555; font-size: 0.9em; }
.verdict { font-size: 1.15em; }
"""


def _float(value: Any) -> float:
    try:
        return float(value) if value not in ("", None) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, digits: int = 3) -> str:
    v = _float(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else ""


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    # matplotlib's object API rather than pyplot: no GUI backend, no global figure state.
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="{_png(fig)}" alt="{html.escape(alt)}">'


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int = 1, table_id: str = "") -> str:
    """An HTML table; cells are escaped unless they are already-built markup (`_Markup`)."""
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(
        f'<th class="text">{html.escape(c)}</th>' if i < text_columns else f"<th>{html.escape(c)}</th>"
        for i, c in enumerate(columns)
    )
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            content = cell.markup if isinstance(cell, _Markup) else html.escape(str(cell))
            cells.append(f'<td class="text">{content}</td>' if i < text_columns else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="wide"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


class _Markup:
    def __init__(self, markup: str) -> None:
        self.markup = markup


def _audio(out_dir: Path, path: Path) -> _Markup:
    """An audio player linking `path` relative to OUT (or a dash when the file is absent)."""
    if not path.is_file():
        return _Markup("&ndash;")
    rel = Path(os.path.relpath(path, out_dir)).as_posix()
    return _Markup(f'<audio controls preload="none" src="{html.escape(quote(rel))}"></audio>')


# ---------------------------------------------------------------------------------------
# Sections


def _summary_section(summary: Sequence[Mapping[str, str]]) -> str:
    if not summary:
        return "<p>No summary.csv: run the evaluation first.</p>"
    rows = [
        [
            r["group"],
            r["metric"],
            r["n"],
            _fmt(r["noisy_mean"]),
            f"{_fmt(r['enhanced_mean'])} [{_fmt(r['enhanced_ci95_low'])}, {_fmt(r['enhanced_ci95_high'])}]",
            f"{_fmt(r['delta_mean'])} [{_fmt(r['delta_ci95_low'])}, {_fmt(r['delta_ci95_high'])}]",
        ]
        for r in summary
    ]
    return (
        "<p class=\"note\">Per rec group and over all files (<em>all</em>): mean of the noisy input, "
        "of the enhanced output and of the improvement (enhanced &minus; noisy), with 95% "
        "t-intervals.</p>"
        + _table(["group", "metric", "n", "noisy", "enhanced [95% CI]", "improvement [95% CI]"], rows, 2,
                 "summary-table")
    )


def quality_compute_figure(strategies: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Mean label metric against compute per file (x the best single model's): every strategy a
    point, the cost_aware lambda sweep a line; None without the columns to draw it."""
    if not strategies or "compute_vs_best_single" not in strategies[0]:
        return None
    label = str(strategies[0]["label_metric"])
    points = [(str(r["strategy"]), _float(r["compute_vs_best_single"]), _float(r[label])) for r in strategies]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    if not points:
        return None
    fig, ax = _figure(7.5, 4.8)
    curve = sorted((x, y) for name, x, y in points if "@" in name)
    if curve:
        ax.plot(*zip(*curve, strict=True), "-", color="#999", lw=1.2, zorder=1, label="cost_aware, lambda swept")
    for name, x, y in points:
        if "@" in name:
            continue
        kind = ("oracle" if name == "oracle" else "fixed" if name.startswith("always_") or name == "noisy"
                else "adaptive")
        style = {"oracle": ("*", "#d62728"), "fixed": ("s", "#1f77b4"), "adaptive": ("o", "#2ca02c")}[kind]
        ax.scatter([x], [y], marker=style[0], color=style[1], s=40, zorder=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("compute (x the best single model's: enhancers + recommender + DNSMOS checks)")
    ax.set_ylabel(f"mean {METRICS[label].heading}")
    ax.set_title("Quality vs compute (oracle: known for free)")
    ax.grid(alpha=0.3)
    if curve:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def _verdict_section(strategies: Sequence[Mapping[str, str]]) -> str:
    """The answer first: one line and the quality-vs-compute plot."""
    if not strategies or "label_metric" not in strategies[0]:
        return ""
    fig = quality_compute_figure(strategies)
    return (f'<p class="verdict"><b>{html.escape(verdict(strategies))}</b></p>'
            + (_img(fig, "quality vs compute of every strategy") if fig is not None else ""))


def _strategies_section(strategies: Sequence[Mapping[str, str]]) -> str:
    if not strategies:
        return ("<p>No strategy comparison: pass <code>--labels_csv</code> (enhancement_driver's "
                "labels.csv for the same files) to compare with single models and the oracle.</p>")
    label = strategies[0].get("label_metric") or "dnsmos_ovr"
    # The headline metrics; strategies.csv has every one.
    metrics = list(dict.fromkeys([label, *(m for m in HEADLINE_METRICS if any(r.get(m) for r in strategies))]))
    columns = ["strategy", "files", *(METRICS[m].heading for m in metrics), "gain [95% CI]",
               "captured [95% CI]", "regret", "total s", "x compute", "PESQ-best agreement"]

    def captured(r: Mapping[str, str]) -> str:
        value = _float(r["oracle_gain_captured"])
        if not math.isfinite(value):
            return ""
        low, high = _float(r["captured_ci_low"]), _float(r["captured_ci_high"])
        return f"{100 * value:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"

    rows = [
        [r["strategy"], r["files"], *(_fmt(r[m]) for m in metrics),
         f"{_fmt(r['gain_over_best_single'])} [{_fmt(r['gain_ci_low'])}, {_fmt(r['gain_ci_high'])}]",
         captured(r), _fmt(r["regret"]), _fmt(r["total_seconds"], 1), _fmt(r["compute_vs_best_single"], 2),
         _fmt(r["pesq_best_agreement"], 2)]
        for r in strategies
    ]
    return (
        f"<p class=\"note\">All strategies scored from the enhancement step's scores on the same files. "
        f"Gain = mean {html.escape(METRICS[label].heading)} minus the best single model's, with a 95% "
        "paired-bootstrap interval over files; captured = that gain as a share of the oracle's; regret = "
        "mean loss per file against the oracle. Seconds: the enhancers a strategy runs, its recommender "
        "(features + prediction) and the DNSMOS scorings it makes to choose (run-all, verify).</p>"
        + _table(columns, rows, 1, "strategies-table")
        + "<dl>" + "".join(f"<dt>{html.escape(r['strategy'])}</dt><dd>{html.escape(r['description'])}</dd>"
                           for r in strategies) + "</dl>"
    )


def _mix_section(recommendations: Sequence[Mapping[str, str]]) -> str:
    counts = Counter(r["recommendation"] for r in recommendations)
    routed = Counter(r["routed_model"] for r in recommendations)
    if not counts:
        return "<p>No recommendations.csv.</p>"
    labels = sorted(counts, key=lambda k: -counts[k])
    fig, ax = _figure(max(4, 1.1 * len(labels)), 3)
    ax.bar(labels, [counts[k] for k in labels], color="#4c72b0")
    ax.set_ylabel("files")
    ax.set_title("recommendations")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    total = sum(counts.values())
    rows = [[k, counts[k], f"{100 * counts[k] / total:.1f}%"] for k in labels]
    routed_rows = [[k, routed[k]] for k in sorted(routed, key=lambda k: -routed[k])]
    return (
        _img(fig, "recommendation mix")
        + _table(["recommendation", "files", "share"], rows, 1, "mix-table")
        + "<p class=\"note\">Models actually run (All_Failed goes to the fallback model):</p>"
        + _table(["routed model", "files"], routed_rows, 1)
    )


def _boxplot(groups: Mapping[str, Sequence[float]], title: str, ylabel: str) -> str:
    data = {k: [v for v in vals if math.isfinite(v)] for k, vals in groups.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return ""
    fig, ax = _figure(max(4, 1.2 * len(data)), 3.2)
    ax.boxplot(list(data.values()))
    ax.set_xticks(range(1, len(data) + 1), [f"{k} (n={len(v)})" for k, v in data.items()],
                  rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _img(fig, title)


def _distributions_section(evaluation: Sequence[Mapping[str, str]], enh_scores: Any, files: Sequence[str]) -> str:
    ok = [r for r in evaluation if r["status"] == "ok"]
    parts = []
    by_group: dict[str, list[float]] = {}
    delta_by_group: dict[str, list[float]] = {}
    for r in ok:
        by_group.setdefault(r["group"], []).append(_float(r["enhanced_dnsmos_ovr"]))
        delta_by_group.setdefault(r["group"], []).append(_float(r["delta_dnsmos_ovr"]))
    parts.append(_boxplot(by_group, "DNSMOS OVR of the routed output, per rec group", "DNSMOS OVR"))
    parts.append(_boxplot(delta_by_group, "OVR improvement over the noisy input, per rec group", "delta OVR"))
    if enh_scores is not None and files:
        systems = ["noisy", *enh_scores.models]
        per_model = {s: [enh_scores.value(f, s, "dnsmos_ovr") for f in files] for s in systems}
        parts.append(_boxplot(per_model, "DNSMOS OVR of every model on these files (enhancement step)", "DNSMOS OVR"))
    parts = [p for p in parts if p]
    return "".join(parts) if parts else "<p>No scores to plot.</p>"


def _confusion_section(recommendations: Sequence[Mapping[str, str]], labels: Mapping[str, str] | None) -> str:
    if labels is None:
        return "<p>Labels unknown: pass <code>--labels_csv</code> to compare recommendations with the best model per file.</p>"
    pairs = [(labels[r["file"]], r["recommendation"]) for r in recommendations if r["file"] in labels]
    if not pairs:
        return "<p>No recommended file has a label in the given labels.csv.</p>"
    classes = sorted({t for t, _ in pairs} | {p for _, p in pairs})
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, pred in pairs:
        matrix[index[truth], index[pred]] += 1
    accuracy = float(np.trace(matrix) / matrix.sum())
    fig, ax = _figure(1.2 * len(classes) + 2, 1.0 * len(classes) + 1.5)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("recommendation")
    ax.set_ylabel("label (best model)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title(f"confusion matrix, accuracy {accuracy:.2f}")
    rows = [[c, *matrix[i].tolist()] for i, c in enumerate(classes)]
    return (
        f"<p class=\"note\">{len(pairs)} files with a label; rows: label from labels.csv, "
        f"columns: recommendation. Accuracy {accuracy:.3f}.</p>"
        + _img(fig, "confusion matrix")
        + _table(["label \\ recommendation", *classes], rows, 1, "confusion-table")
    )


def _listening_rows(evaluation: Sequence[Mapping[str, str]], limit: int) -> list[Mapping[str, str]]:
    """Up to `limit` files, taken from the groups in turn so every group is heard."""
    by_group: dict[str, list[Mapping[str, str]]] = {}
    for row in sorted(evaluation, key=lambda r: (r["group"], r["file"])):
        by_group.setdefault(row["group"], []).append(row)
    chosen: list[Mapping[str, str]] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in by_group.values()):
        for rows in by_group.values():
            if depth < len(rows) and len(chosen) < limit:
                chosen.append(rows[depth])
        depth += 1
    return chosen


def _listening_section(
    out_dir: Path,
    evaluation: Sequence[Mapping[str, str]],
    labels: Mapping[str, str] | None,
    enh_dir: Path | None,
    models: Sequence[str],
    limit: int,
) -> str:
    chosen = _listening_rows(evaluation, limit)
    if not chosen:
        return "<p>No evaluated files.</p>"
    others = [m for m in models if enh_dir is not None and (enh_dir / ENHANCED_DIR / m).is_dir()]
    columns = ["file", "recommendation", "routed model", *(["label"] if labels else []),
               "OVR noisy", "OVR routed", "noisy", "routed output", *others]
    rows = []
    for r in chosen:
        folder = out_dir / rec_folder_name(r["group"])
        rows.append([
            r["file"], r["group"], r["routed_model"], *([labels.get(r["file"], "")] if labels else []),
            _fmt(r["noisy_dnsmos_ovr"]), _fmt(r["enhanced_dnsmos_ovr"]),
            _audio(out_dir, folder / r["file"]),
            _audio(out_dir, folder / ENHANCED_DIR / r["file"]),
            *(_audio(out_dir, enh_dir / ENHANCED_DIR / m / r["file"]) for m in others if enh_dir is not None),
        ])
    shown = f"{len(chosen)} of {len(evaluation)}" if len(chosen) < len(evaluation) else f"all {len(chosen)}"
    note = (f"<p class=\"note\">{shown} files (taken from every group in turn). Audio is linked by "
            "relative path: keep report.html inside its output folder"
            + (" and the enhancement output where it is" if others else "") + ".</p>")
    return note + _table(columns, rows, 3 + bool(labels), "listening-table")


def _run_section(out_dir: Path) -> str:
    path = out_dir / RECOMMENDER_JSON
    if not path.is_file():
        return ""
    info = json.loads(path.read_text(encoding="utf-8"))
    rows = [[stage, c.get("path", ""), c.get("fold", ""), ", ".join(c.get("class_names", [])),
             ", ".join(c.get("feature_names", [])) or "none"]
            for stage, c in info.get("checkpoints", {}).items()]
    timing = info.get("inference", {})
    per_file = timing.get("seconds", 0) / timing["files"] if timing.get("files") else math.nan
    return (
        f"<p>Routing: <b>{html.escape(str(info.get('routing', '')))}</b>; gatekeeper class "
        f"<b>{html.escape(str(info.get('gatekeeper_class', '')))}</b> (threshold "
        f"{info.get('gatekeeper_threshold', '')}); All_Failed files go to "
        f"<b>{html.escape(str(info.get('fallback_model', '')))}</b>; recommender inference "
        f"{_fmt(per_file, 3)} s per file.</p>"
        + _table(["stage", "checkpoint", "fold", "classes", "features"], rows, 5)
    )


def write_report(
    out_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    max_listening_rows: int = DEFAULT_LISTENING_ROWS,
) -> Path:
    """Build OUT/report.html from OUT's CSVs (and ENH's scores and audio with `labels_csv`)."""
    out_dir = Path(out_dir)
    recommendations = read_recommendations(out_dir)
    evaluation = read_evaluation(out_dir)
    summary = read_summary(out_dir)
    strategies = read_strategies(out_dir)
    enh_scores = read_enhancement_scores(labels_csv) if labels_csv is not None else None
    labels = enh_scores.labels if enh_scores is not None else None
    files = [r["file"] for r in recommendations] or sorted({r["file"] for r in evaluation})
    if not recommendations:
        recommendations = [{"file": r["file"], "recommendation": r["group"], "routed_model": r["routed_model"]}
                           for r in evaluation]
    sections = [
        ("Verdict", _verdict_section(strategies)),
        ("Run", _run_section(out_dir)),
        ("Summary", _summary_section(summary)),
        ("Strategies", _strategies_section(strategies)),
        ("Recommendation mix", _mix_section(recommendations)),
        ("Score distributions", _distributions_section(evaluation, enh_scores, files)),
        ("Confusion matrix", _confusion_section(recommendations, labels)),
        ("Listening", _listening_section(
            out_dir, evaluation, labels, enh_scores.labels_csv.parent if enh_scores else None,
            enh_scores.models if enh_scores else [], max_listening_rows)),
    ]
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{content}</section>" for t, content in sections if content)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>serec recommendation report</title><style>{CSS}</style></head><body>"
        f"<h1>serec recommendation report</h1><p class=\"note\">{html.escape(str(out_dir))}, "
        f"{len(files)} files, generated {stamp}.</p>{body}</body></html>\n"
    )
    return write_text_atomic(out_dir / REPORT_HTML, page)


__all__ = ["DEFAULT_LISTENING_ROWS", "REPORT_HTML", "quality_compute_figure", "write_report"]

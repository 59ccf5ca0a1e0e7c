"""report.html: self-contained (no scripts, no external resources, plots inlined), audio linked
by relative paths that exist, and it renders in headless Chromium without console errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from serec.assessment import EVALUATION_COLUMNS, SUMMARY_COLUMNS, summarise
from serec.audio import write_wav
from serec.fileio import write_csv_atomic
from serec.report import write_report
from serec.strategies import compare_strategies, read_enhancement_scores, write_strategies
from serec.synth import speech_like

FILES = {"a.wav": "speex", "b.wav": "speex", "sub/c d.wav": "All_Failed", "e&f.wav": "rnnoise"}
TABLES = ("summary-table", "strategies-table", "mix-table", "confusion-table", "listening-table")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, list[dict[str, str | None]]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.setdefault(tag, []).append(dict(attrs))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture
def report_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A routed OUT (audio, recommendations, evaluation, summary, recommender.json) and an
    enhancement step's folder (labels.csv, scores.csv, enhanced/<MODEL>/) for its files."""
    rng = np.random.default_rng(2)
    out, enh = tmp_path / "out", tmp_path / "enh"
    recs, evaluation, scores, labels = [], [], [], []
    for i, (fid, label) in enumerate(FILES.items()):
        audio = speech_like(rng, 0.6)
        routed = "speex" if label == "All_Failed" else label
        write_wav(out / f"rec_{label}" / fid, audio)
        write_wav(out / f"rec_{label}" / "enhanced" / fid, 0.5 * audio)
        for model in ("speex", "rnnoise"):
            write_wav(enh / "enhanced" / model / fid, 0.4 * audio)
        recs.append({"file": fid, "recommendation": label, "p_speex": 0.5, "p_rnnoise": 0.3,
                     "p_All_Failed": 0.2, "routed_model": routed})
        row = {c: math.nan for c in EVALUATION_COLUMNS}
        row.update(file=fid, group=label, routed_model=routed, status="ok", error="", duration_s=0.6,
                   inputs_sha1="x", noisy_dnsmos_ovr=1.5 + 0.1 * i, enhanced_dnsmos_ovr=2.0 + 0.2 * i,
                   delta_dnsmos_ovr=0.5 + 0.1 * i)
        evaluation.append(row)
        ovr = {"noisy": 1.5 + 0.1 * i, "speex": 2.0 + 0.3 * (i % 2), "rnnoise": 2.1}
        for system, value in ovr.items():
            scores.append({"file": fid, "system": system, "status": "ok", "dnsmos_ovr": value,
                           "seconds": 0.0 if system == "noisy" else 0.1})
        best = max(("speex", "rnnoise"), key=lambda m, ovr=ovr: ovr[m])
        labels.append({"file": fid, "label": best, "best_model": best, "best_ovr": ovr[best],
                       "speex_ovr": ovr["speex"], "rnnoise_ovr": ovr["rnnoise"]})
    columns = ["file", "recommendation", "p_speex", "p_rnnoise", "p_All_Failed", "routed_model"]
    write_csv_atomic(out / "recommendations.csv", columns, recs)
    write_csv_atomic(out / "evaluation.csv", EVALUATION_COLUMNS, evaluation)
    write_csv_atomic(out / "summary.csv", SUMMARY_COLUMNS, summarise(evaluation))
    (out / "recommender.json").write_text(json.dumps({
        "checkpoints": {"gatekeeper": {"path": "gk.pth", "fold": 1, "class_names": ["speex", "not_speex"]}},
        "routing": "two_stage", "gatekeeper_class": "speex", "gatekeeper_threshold": 0.5,
        "fallback_model": "speex", "inference": {"seconds": 0.4, "files": 4}}))
    write_csv_atomic(enh / "scores.csv", ["file", "system", "status", "dnsmos_ovr", "seconds"], scores)
    write_csv_atomic(enh / "labels.csv", ["file", "label", "best_model", "best_ovr", "speex_ovr", "rnnoise_ovr"],
                     labels)
    comparison = compare_strategies(recs, read_enhancement_scores(enh / "labels.csv"), fallback_model="speex",
                                    inference_seconds_per_file=0.1, dnsmos_seconds_per_file=0.2)
    write_strategies(out, comparison)
    return out, enh


def test_report_is_self_contained_with_working_relative_audio_links(report_dirs: tuple[Path, Path]) -> None:
    out, enh = report_dirs
    path = write_report(out, enh / "labels.csv")
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "http://" not in text and "https://" not in text
    images = page.tags["img"]
    assert len(images) >= 5 and all(str(img["src"]).startswith("data:image/png;base64,") for img in images)
    ids = {t.get("id") for t in page.tags["table"]}
    assert set(TABLES) <= ids
    sources = [str(a["src"]) for a in page.tags["audio"]]
    # Per file: noisy copy, routed output, and each model's output from the enhancement step.
    assert len(sources) == len(FILES) * 4
    for src in sources:
        assert not src.startswith(("/", "file:")) and (out / unquote(src)).resolve().is_file(), src
    assert any("rec_All_Failed/sub/c%20d.wav" in s for s in sources)
    assert any(s.endswith("e%26f.wav") for s in sources)


def test_report_without_labels_or_comparison(report_dirs: tuple[Path, Path]) -> None:
    out, _ = report_dirs
    (out / "strategies.csv").unlink()
    page = _parse(write_report(out).read_text(encoding="utf-8"))
    ids = {t.get("id") for t in page.tags["table"]}
    assert {"summary-table", "mix-table", "listening-table"} <= ids
    assert not {"confusion-table", "strategies-table"} & ids
    assert len(page.tags["audio"]) == len(FILES) * 2


def _render(chromium: str, page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


def _console_lines(stderr: str) -> list[str]:
    # With --enable-logging, every console message (errors, uncaught exceptions) is a CONSOLE line.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_renders_in_headless_chromium(report_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`; the Makefile installs it for CI)")
    # The check can see errors: a page with a script error logs a CONSOLE line.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefined_function();</script></body></html>")
    assert _console_lines(_render(chromium, broken, tmp_path / "profile0").stderr)

    out, enh = report_dirs
    path = write_report(out, enh / "labels.csv")
    result = _render(chromium, path, tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console_lines(result.stderr) == []
    dom = _parse(result.stdout)
    assert set(TABLES) <= {t.get("id") for t in dom.tags["table"]}
    assert len(dom.tags["audio"]) == len(FILES) * 4
    assert "serec recommendation report" in result.stdout

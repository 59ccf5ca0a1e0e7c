"""Evaluation of rec folders (pairing, scores, t-intervals, resuming) and the strategy comparison."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from serec.assessment import (
    EVALUATION_CSV,
    SUMMARY_CSV,
    evaluate_rec_folders,
    mean_ci95,
    pair_rec_folders,
    summarise,
)
from serec.audio import load_audio, write_wav
from serec.fileio import write_csv_atomic
from serec.quality import QualityScorer
from serec.strategies import compare_strategies, format_strategies, read_enhancement_scores
from serec.synth import NOISE_KINDS, speech_like


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def routed_out(tmp_path: Path) -> tuple[Path, Path]:
    """OUT with rec_speex (2 files) and rec_All_Failed (1 file): noisy copies, enhanced
    outputs (a cleaner mixture), and a clean folder missing one reference, with one extra."""
    rng = np.random.default_rng(12)  # speech that PESQ and STOI find utterances in
    out, clean_dir = tmp_path / "out", tmp_path / "clean"
    layout = {"a.wav": "speex", "b.wav": "speex", "c.wav": "All_Failed"}
    for fid, label in layout.items():
        clean = speech_like(rng, 1.5)
        noise = NOISE_KINDS["pink"](rng, 1.5)
        write_wav(out / f"rec_{label}" / fid, clean + 0.3 * noise)
        write_wav(out / f"rec_{label}" / "enhanced" / fid, clean + 0.06 * noise)
        if fid != "c.wav":
            write_wav(clean_dir / fid, clean)
    write_wav(clean_dir / "unrelated.wav", 0.5 * speech_like(rng, 1.0))
    return out, clean_dir


def test_pairing_reports_clean_name_mismatches(routed_out: tuple[Path, Path], tmp_path: Path) -> None:
    out, clean_dir = routed_out
    pairing = pair_rec_folders(out, clean_dir)
    assert [(p.group, p.file) for p in pairing.pairs] == [
        ("All_Failed", "c.wav"), ("speex", "a.wav"), ("speex", "b.wav")]
    assert pairing.missing_clean == ["c.wav"]
    assert pairing.unmatched_clean == 1
    text = "\n".join(pairing.messages())
    assert "1 noisy files have no clean reference" in text and "c.wav" in text
    assert "1 files in" in text and "match no routed noisy file" in text

    wrong = tmp_path / "wrong_clean"
    write_wav(wrong / "x.wav", np.full(16000, 0.1, dtype=np.float32))
    with pytest.raises(ValueError, match="same name"):
        pair_rec_folders(out, wrong)
    with pytest.raises(FileNotFoundError, match="no rec_<LABEL> folders"):
        pair_rec_folders(tmp_path / "wrong_clean")


def test_evaluation_scores_deltas_and_rebuilds_the_same_csv(routed_out: tuple[Path, Path]) -> None:
    out, clean_dir = routed_out
    (out / "rec_speex" / "enhanced" / "b.wav").unlink()
    first = evaluate_rec_folders(out, clean_dir)
    assert (first.files, first.scored_now, first.errors) == (3, 3, 1)
    assert any("no enhanced output" in m and "rec_speex/b.wav" in m for m in first.messages)
    rows = {r["file"]: r for r in _read(out / EVALUATION_CSV)}
    assert rows["b.wav"]["status"] == "error"
    assert rows["c.wav"]["noisy_pesq_wb"] == "" and "no clean reference" in rows["c.wav"]["error"]

    # The scores are QualityScorer's on the files, and delta = enhanced - noisy.
    a = rows["a.wav"]
    noisy, enhanced = load_audio(out / "rec_speex" / "a.wav"), load_audio(out / "rec_speex" / "enhanced" / "a.wav")
    clean = load_audio(clean_dir / "a.wav")
    direct = QualityScorer().score_batch([noisy, enhanced], [clean, clean])
    for metric in ("dnsmos_ovr", "pesq_wb", "si_sdr"):
        assert float(a[f"noisy_{metric}"]) == pytest.approx(direct[0].values[metric], abs=1e-5)
        assert float(a[f"enhanced_{metric}"]) == pytest.approx(direct[1].values[metric], abs=1e-5)
        assert float(a[f"delta_{metric}"]) == pytest.approx(
            float(a[f"enhanced_{metric}"]) - float(a[f"noisy_{metric}"]), abs=2e-6)
    assert float(a["delta_si_sdr"]) > 10 and float(a["delta_pesq_wb"]) > 0.5  # less noise

    summary = _read(out / SUMMARY_CSV)
    assert {(r["group"], r["metric"]) for r in summary} >= {("speex", "dnsmos_ovr"), ("all", "dnsmos_ovr"),
                                                            ("all", "pesq_wb")}
    overall = next(r for r in summary if r["group"] == "all" and r["metric"] == "dnsmos_ovr")
    assert overall["n"] == "2"  # a.wav and c.wav; b.wav has no output

    # Resume: unchanged files are not rescored; a new output is scored; a rebuild matches.
    write_wav(out / "rec_speex" / "enhanced" / "b.wav", load_audio(out / "rec_speex" / "b.wav"))
    second = evaluate_rec_folders(out, clean_dir)
    assert (second.scored_now, second.reused, second.errors) == (1, 2, 0)
    kept = (out / EVALUATION_CSV).read_bytes()
    (out / EVALUATION_CSV).unlink()
    (out / SUMMARY_CSV).unlink()
    rebuilt = evaluate_rec_folders(out, clean_dir)
    assert rebuilt.scored_now == 3
    assert (out / EVALUATION_CSV).read_bytes() == kept


def test_mean_ci95_is_the_student_t_interval() -> None:
    values = [2.1, 2.5, 1.9, 3.0, 2.2]
    mean, low, high = mean_ci95(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx(ref)
    assert mean_ci95([1.0, math.nan, 3.0])[0] == 2.0
    one = mean_ci95([1.5])
    assert one[0] == 1.5 and math.isnan(one[1]) and math.isnan(one[2])

    rows = [
        {"group": g, "status": "ok", **{f"{s}_dnsmos_ovr": v for s, v in zip(("noisy", "enhanced", "delta"), t, strict=True)}}
        for g, t in [("x", (1.0, 2.0, 1.0)), ("x", (1.5, 2.0, 0.5)), ("y", (2.0, 3.5, 1.5))]
    ]
    for row in rows:
        row.update({f"{s}_{m}": math.nan for s in ("noisy", "enhanced", "delta")
                    for m in ("dnsmos_sig", "dnsmos_bak", "dnsmos_p808", "pesq_wb", "stoi", "estoi", "si_sdr")})
    out = {(r["group"], r["metric"]): r for r in summarise(rows)}
    assert set(out) == {("x", "dnsmos_ovr"), ("y", "dnsmos_ovr"), ("all", "dnsmos_ovr")}
    assert out["all", "dnsmos_ovr"]["delta_mean"] == pytest.approx(1.0)
    assert out["x", "dnsmos_ovr"]["n"] == 2


# ---------------------------------------------------------------------------------------
# Strategy comparison on hand-made enhancement scores


def _enhancement_dir(tmp_path: Path) -> Path:
    """labels.csv + scores.csv for 4 files, models A and B (OVR, PESQ, seconds chosen by hand)."""
    enh = tmp_path / "enh"
    ovr = {  # file: (noisy, A, B)
        "f1.wav": (1.0, 2.0, 3.0),
        "f2.wav": (1.5, 3.0, 2.0),
        "f3.wav": (1.2, 2.5, 2.4),
        "f4.wav": (1.1, 2.0, 2.2),
        "f5.wav": (1.0, 2.0, math.nan),  # B failed here: left out of every strategy
    }
    seconds = {"noisy": 0.0, "A": 1.0, "B": 3.0}
    rows, labels = [], []
    for fid, values in ovr.items():
        for system, value in zip(("noisy", "A", "B"), values, strict=True):
            rows.append({"file": fid, "system": system, "status": "error" if math.isnan(value) else "ok",
                         "error": "", "dnsmos_ovr": value, "pesq_wb": value + 0.5, "seconds": seconds[system]})
        best = "A" if not values[2] >= values[1] else "B"
        labels.append({"file": fid, "label": best, "best_model": best, "best_ovr": max(values[1:]),
                       "A_ovr": values[1], "B_ovr": values[2]})
    write_csv_atomic(enh / "scores.csv", ["file", "system", "status", "error", "dnsmos_ovr", "pesq_wb", "seconds"], rows)
    write_csv_atomic(enh / "labels.csv", ["file", "label", "best_model", "best_ovr", "A_ovr", "B_ovr"], labels)
    return enh / "labels.csv"


def test_strategies_against_hand_computed_values(tmp_path: Path) -> None:
    scores = read_enhancement_scores(_enhancement_dir(tmp_path))
    assert scores.models == ["A", "B"]
    recs = [  # adaptive: right on f1, f2; wrong on f3; All_Failed -> fallback "none" on f4
        {"file": "f1.wav", "recommendation": "B", "routed_model": "B", "single_recommendation": "A"},
        {"file": "f2.wav", "recommendation": "A", "routed_model": "A", "single_recommendation": "A"},
        {"file": "f3.wav", "recommendation": "B", "routed_model": "B", "single_recommendation": "A"},
        {"file": "f4.wav", "recommendation": "All_Failed", "routed_model": "none", "single_recommendation": "All_Failed"},
        {"file": "f5.wav", "recommendation": "A", "routed_model": "A", "single_recommendation": "A"},
    ]
    result = compare_strategies(recs, scores, fallback_model="none",
                                inference_seconds_per_file=0.5, dnsmos_seconds_per_file=0.25)
    assert result.files == ["f1.wav", "f2.wav", "f3.wav", "f4.wav"]
    assert list(result.left_out) == ["f5.wav"]
    ovr = {r.strategy: r.means["dnsmos_ovr"] for r in result.rows}
    assert ovr["always_A"] == pytest.approx((2 + 3 + 2.5 + 2) / 4)
    assert ovr["always_B"] == pytest.approx((3 + 2 + 2.4 + 2.2) / 4)
    assert result.best_single == "B"
    assert ovr["oracle"] == pytest.approx((3 + 3 + 2.5 + 2.2) / 4)
    assert ovr["run_all_pick_best_ovr"] == ovr["oracle"]
    assert ovr["adaptive"] == pytest.approx((3 + 3 + 2.4 + 1.1) / 4)  # f4 keeps the noisy input
    assert ovr["adaptive_single_model"] == pytest.approx((2 + 3 + 2.5 + 1.1) / 4)
    assert ovr["random_expected"] == pytest.approx((ovr["always_A"] + ovr["always_B"]) / 2)
    assert ovr["noisy"] == pytest.approx((1 + 1.5 + 1.2 + 1.1) / 4)
    expected_fraction = (ovr["adaptive"] - ovr["always_B"]) / (ovr["oracle"] - ovr["always_B"])
    assert result.captured_fraction == pytest.approx(expected_fraction)
    assert result.row("oracle").oracle_gain_captured == pytest.approx(1.0)
    assert result.row("always_B").oracle_gain_captured == pytest.approx(0.0)
    assert result.row("adaptive").means["pesq_wb"] == pytest.approx(ovr["adaptive"] + 0.5)

    cost = {r.strategy: r for r in result.rows}
    assert cost["adaptive"].enhancer_seconds == pytest.approx(3 + 1 + 3 + 0)
    assert cost["adaptive"].recommender_seconds == pytest.approx(4 * 0.5)
    assert cost["always_A"].total_seconds == pytest.approx(4.0)
    assert cost["oracle"].enhancer_seconds == pytest.approx(3 + 1 + 1 + 3)
    assert cost["run_all_pick_best_ovr"].enhancer_seconds == pytest.approx(16.0)
    assert cost["run_all_pick_best_ovr"].dnsmos_seconds == pytest.approx(4 * 2 * 0.25)
    assert cost["random_expected"].enhancer_seconds == pytest.approx(8.0)

    table = format_strategies(result)
    assert "verdict: adaptive is not significantly worse than always_B" in table and "captured" in table
    # Paired bootstrap: the baseline against itself has a zero interval; the oracle loses nothing.
    baseline = result.row("always_B")
    assert (baseline.gain.low, baseline.gain.high, baseline.compute_vs_best_single) == (0.0, 0.0, 1.0)
    assert result.row("oracle").regret == 0.0
    adaptive = result.row("adaptive")
    assert adaptive.gain.low <= adaptive.gain.estimate <= adaptive.gain.high
    assert adaptive.regret == pytest.approx(ovr["oracle"] - ovr["adaptive"])


def test_strategies_refuse_files_without_scores(tmp_path: Path) -> None:
    scores = read_enhancement_scores(_enhancement_dir(tmp_path))
    with pytest.raises(ValueError, match="same noisy files"):
        compare_strategies([{"file": "other.wav", "recommendation": "A", "routed_model": "A"}], scores,
                           fallback_model="A")
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_enhancement_scores(tmp_path / "nowhere" / "labels.csv")


def test_verdict_words_an_identical_routing_and_a_significant_gain() -> None:
    from serec.strategies import verdict

    def row(strategy: str, ovr: float, gain: tuple[float, float, float]) -> dict[str, object]:
        return {"strategy": strategy, "files": 10, "label_metric": "dnsmos_ovr", "dnsmos_ovr": ovr,
                "gain_over_best_single": gain[0], "gain_ci_low": gain[1], "gain_ci_high": gain[2],
                "oracle_gain_captured": 0.0, "compute_vs_best_single": 1.0}

    fixed = [row("always_A", 3.0, (0.0, 0.0, 0.0)), row("always_B", 2.5, (-0.5, -0.7, -0.3))]
    identical = verdict([*fixed, row("adaptive", 3.0, (0.0, 0.0, 0.0))])
    assert identical.startswith("adaptive is identical to always_A (the best single model) on 10 files")
    better = verdict([*fixed, row("adaptive", 3.2, (0.2, 0.05, 0.35))])
    assert better.startswith("adaptive is better than always_A") and "+0.200 [95% CI +0.050, +0.350]" in better
    unsure = verdict([*fixed, row("adaptive", 2.9, (-0.1, -0.3, 0.1))])
    assert unsure.startswith("adaptive is not significantly worse than always_A")

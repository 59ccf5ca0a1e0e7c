"""Routing: one rec folder per file holding that file's own bytes, per-folder enhancement,
All_Failed to the fallback, resuming."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serec.audio import load_audio, to_pcm16, write_wav
from serec.enhancers import ModelsConfigError, create_enhancer
from serec.fileio import RowLog
from serec.labels import ALL_FAILED
from serec.routing import (
    ENHANCED_DIR,
    ROUTING_COLUMNS,
    ROUTING_CSV,
    Route,
    copy_routed_files,
    enhance_routed_files,
    find_rec_folders,
    group_files,
    rec_folder_name,
    routed_model_for,
)
from serec.synth import NOISE_KINDS, speech_like


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def noisy_dir(tmp_path: Path) -> Path:
    """Six 1 s files with different content, one in a subfolder."""
    rng = np.random.default_rng(3)
    root = tmp_path / "noisy"
    kinds = ["pink", "babble", "hum", "white", "pink", "babble"]
    for i, kind in enumerate(kinds):
        name = f"sub/f{i}.wav" if i == 5 else f"f{i}.wav"
        write_wav(root / name, 0.5 * speech_like(rng, 1.0) + 0.1 * NOISE_KINDS[kind](rng, 1.0))
    return root


def _routes(fallback: str = "none") -> list[Route]:
    recs = ["speex", "none", ALL_FAILED, "speex", ALL_FAILED, "none"]
    names = [f"f{i}.wav" for i in range(5)] + ["sub/f5.wav"]
    return [Route(n, r, routed_model_for(r, fallback)) for n, r in zip(names, recs, strict=True)]


def _holders(out: Path, fid: str) -> list[str]:
    return [p.name for p in find_rec_folders(out).values() if (p / fid).is_file()]


def test_rec_folder_names_have_no_spaces() -> None:
    assert rec_folder_name(ALL_FAILED) == "rec_All_Failed"
    assert rec_folder_name("All Failed") == "rec_All_Failed"
    assert rec_folder_name("SGMSE") == "rec_SGMSE"
    for bad in ("", "a/b", "..", " "):
        with pytest.raises(ValueError):
            rec_folder_name(bad)


def test_every_file_lands_in_exactly_one_folder_with_its_own_audio(noisy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    routes = _routes()
    summary = copy_routed_files(noisy_dir, out, routes)
    assert summary.copied == len(routes)
    assert sorted(find_rec_folders(out)) == ["All_Failed", "none", "speex"]
    hashes = set()
    for route in routes:
        assert _holders(out, route.file) == [rec_folder_name(route.recommendation)]
        copy = out / rec_folder_name(route.recommendation) / route.file
        # The thesis wrote every routed file with the last file's waveform: compare bytes.
        assert _sha(copy) == _sha(noisy_dir / route.file)
        hashes.add(_sha(copy))
    assert len(hashes) == len(routes)
    assert group_files(out / "rec_none") == ["f1.wav", "sub/f5.wav"]

    # A changed recommendation moves the file; the others stay untouched.
    mtimes = {r.file: (out / rec_folder_name(r.recommendation) / r.file).stat().st_mtime_ns for r in routes}
    moved = [Route("f0.wav", "none", "none"), *routes[1:]]
    summary = copy_routed_files(noisy_dir, out, moved)
    assert (summary.copied, summary.unchanged, summary.removed_stale) == (1, 5, 1)
    assert _holders(out, "f0.wav") == ["rec_none"]
    for r in routes[1:]:
        assert (out / rec_folder_name(r.recommendation) / r.file).stat().st_mtime_ns == mtimes[r.file]

    # A copy that no longer matches its source is rewritten.
    (out / "rec_speex" / "f3.wav").write_bytes(b"corrupt")
    assert copy_routed_files(noisy_dir, out, moved).copied == 1
    assert _sha(out / "rec_speex" / "f3.wav") == _sha(noisy_dir / "f3.wav")


def test_enhancement_per_folder_with_fallback_for_all_failed(noisy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    routes = _routes(fallback="speex")
    copy_routed_files(noisy_dir, out, routes)
    summary = enhance_routed_files(out, routes)
    assert (summary.files, summary.done_now, summary.errors) == (6, 6, 0)
    assert set(summary.seconds_by_model) == {"speex", "none"}

    speex = create_enhancer("speex")
    for route in routes:
        folder = out / rec_folder_name(route.recommendation)
        noisy = load_audio(folder / route.file)
        written, _ = sf.read(folder / ENHANCED_DIR / route.file, dtype="int16")
        assert written.size == noisy.size
        expected = noisy if route.routed_model == "none" else speex.enhance_one(noisy)
        # Written as 16-bit PCM: compare the file's samples with the expected output's.
        np.testing.assert_array_equal(written, to_pcm16(expected))
    failed = [r for r in routes if r.recommendation == ALL_FAILED]
    assert failed and all(r.routed_model == "speex" for r in failed)
    assert all((out / "rec_All_Failed" / ENHANCED_DIR / r.file).is_file() for r in failed)

    rows = RowLog(out / ROUTING_CSV, ROUTING_COLUMNS).read()
    assert [r["file"] for r in rows] == sorted(r.file for r in routes)
    assert {r["file"]: r["routed_model"] for r in rows} == {r.file: r.routed_model for r in routes}

    # Resume: nothing to do; a deleted output is redone, and only it.
    assert enhance_routed_files(out, routes).done_now == 0
    (out / "rec_speex" / ENHANCED_DIR / "f3.wav").unlink()
    again = enhance_routed_files(out, routes, num_workers=2)
    assert (again.done_now, again.skipped, again.errors) == (1, 5, 0)
    assert (out / "rec_speex" / ENHANCED_DIR / "f3.wav").is_file()


def test_unknown_routed_model_fails_before_any_work(noisy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    routes = [Route("f0.wav", "not_a_model", "not_a_model")]
    copy_routed_files(noisy_dir, out, routes)
    with pytest.raises(ModelsConfigError, match="not_a_model"):
        enhance_routed_files(out, routes)
    assert not (out / ROUTING_CSV).exists()


def test_bad_copy_is_recorded_and_the_rest_go_on(noisy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    routes = _routes()
    copy_routed_files(noisy_dir, out, routes)
    write_wav(out / "rec_speex" / "f0.wav", np.zeros(16000, dtype=np.float32))  # silent
    summary = enhance_routed_files(out, routes)
    assert summary.errors == 1
    rows = {r["file"]: r for r in RowLog(out / ROUTING_CSV, ROUTING_COLUMNS).read()}
    assert rows["f0.wav"]["status"] == "error" and "silent" in rows["f0.wav"]["error"]
    assert all(rows[r.file]["status"] == "ok" for r in routes[1:])

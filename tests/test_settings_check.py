"""Settings that cannot go stale: run.json records each model's settings; a changed one exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serec.audio import write_wav
from serec.enhancement import EnhancementConfig, run_enhancement
from serec.runinfo import SettingsChanged
from serec.synth import speech_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def noisy(tmp_path: Path) -> Path:
    # One file: every run scores it with DNSMOS, the slow part.
    rng = np.random.default_rng(11)
    write_wav(tmp_path / "noisy" / "f0.wav", speech_like(rng, 1.0) + 0.05 * rng.standard_normal(16_000))
    return tmp_path / "noisy"


def models_config(path: Path, **values: object) -> Path:
    lines = ["[spectral_gating]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def driver(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "enhancement_driver.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_a_changed_setting_exits_2_naming_model_and_key_and_overwrite_redoes_it(
    tmp_path: Path, noisy: Path
) -> None:
    out = tmp_path / "out"
    config = models_config(tmp_path / "models.toml", prop_decrease=0.5)
    run = EnhancementConfig(noisy_dir=noisy, output_dir=out, models=["spectral_gating"], models_config=config)
    run_enhancement(run)
    recorded = json.loads((out / "run.json").read_text())["model_settings"]["spectral_gating"]
    assert recorded["settings"]["prop_decrease"] == 0.5 and len(recorded["hash"]) == 16
    wav = out / "enhanced" / "spectral_gating" / "f0.wav"
    first = wav.read_bytes()

    models_config(config, prop_decrease=0.8)
    proc = driver("--noisy_dir", noisy, "--output_dir", out, "--models", "spectral_gating",
                  "--models_config", config)
    assert proc.returncode == 2
    assert "spectral_gating (prop_decrease: 0.5 -> 0.8)" in proc.stderr and "--overwrite" in proc.stderr
    assert wav.read_bytes() == first, "nothing was redone"

    assert run_enhancement(EnhancementConfig(**{**vars(run), "overwrite": True})).pairs_done_now == 2
    assert wav.read_bytes() != first
    recorded = json.loads((out / "run.json").read_text())["model_settings"]["spectral_gating"]
    assert recorded["settings"]["prop_decrease"] == 0.8


def test_keys_that_do_not_shape_outputs_and_other_models_pass(tmp_path: Path, noisy: Path) -> None:
    out = tmp_path / "out"
    base = dict(noisy_dir=noisy, output_dir=out, models=["spectral_gating"])
    run_enhancement(EnhancementConfig(**base, models_config=models_config(tmp_path / "a.toml", prop_decrease=0.5)))
    # batch_size changes how the model runs, not what it outputs.
    again = run_enhancement(EnhancementConfig(
        **base, models_config=models_config(tmp_path / "b.toml", prop_decrease=0.5, batch_size=4)))
    assert again.pairs_done_now == 0
    # Another model run into the folder later keeps the first model's record.
    run_enhancement(EnhancementConfig(noisy_dir=noisy, output_dir=out, models=["speex"]))
    settings = json.loads((out / "run.json").read_text())["model_settings"]
    assert set(settings) == {"spectral_gating", "speex"}
    with pytest.raises(SettingsChanged, match=r"spectral_gating \(prop_decrease: 0.5 -> 1.0\)"):
        run_enhancement(EnhancementConfig(**base))  # the default prop_decrease is 1.0


def test_a_folder_from_before_the_settings_record_resumes(tmp_path: Path, noisy: Path) -> None:
    out = tmp_path / "out"
    config = EnhancementConfig(noisy_dir=noisy, output_dir=out, models=["speex"])
    run_enhancement(config)
    run_json = out / "run.json"
    record = json.loads(run_json.read_text())
    del record["model_settings"]
    run_json.write_text(json.dumps(record))
    again = run_enhancement(config)
    assert again.pairs_done_now == 0
    assert "speex" in json.loads(run_json.read_text())["model_settings"]

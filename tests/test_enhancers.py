"""Built-in enhancers, the registry and the models config: real libraries on generated audio."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from serec.enhancers import (
    DEFAULT_MODELS,
    BuiltinEnhancer,
    EnhancementError,
    EnhancerUnavailable,
    ModelsConfigError,
    available_enhancers,
    create_enhancer,
    load_models_config,
    register_enhancer,
)
from serec.enhancers.builtin import RNNoise
from serec.synth import coloured_noise, speech_like

SR = 16_000
# The DSP built-ins and RNNoise; the pretrained neural ones have tests/test_pretrained_enhancers.py.
BUILTINS = [n for n in available_enhancers() if type(create_enhancer(n)).__module__ == "serec.enhancers.builtin"]
DENOISERS = [n for n in BUILTINS if n != "none"]


def mix(rng: np.random.Generator, snr_db: float, seconds: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    clean = speech_like(rng, seconds)
    noise = coloured_noise(rng, seconds, exponent=0.0)
    gain = np.sqrt(np.sum(clean**2) / np.sum(noise**2) / 10 ** (snr_db / 10))
    return clean, (clean + gain * noise).astype(np.float32)


def xcorr_lag(reference: np.ndarray, signal: np.ndarray, max_lag: int = 2000) -> int:
    """Lag (samples) at which `signal` best matches `reference`; positive = signal is late."""
    n = 2 * reference.size
    cc = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(reference, n)), n)
    window = np.concatenate([cc[-max_lag:], cc[: max_lag + 1]])
    return int(np.argmax(window)) - max_lag


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    scale = np.dot(estimate, reference) / np.dot(reference, reference)
    target = scale * reference
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


@pytest.fixture(scope="module")
def noisy_15db() -> tuple[np.ndarray, np.ndarray]:
    return mix(np.random.default_rng(3), 15.0)


def test_registry_lists_builtins_and_defaults() -> None:
    assert set(BUILTINS) == {"none", "rnnoise", "webrtc", "speex", "spectral_gating", "spectral_gating_stationary"}
    assert {"SGMSE", "StoRM", "CDiffuSE"} <= set(available_enhancers())
    in_process = {n for n in available_enhancers() if create_enhancer(n).kind == "builtin"}
    assert set(DEFAULT_MODELS) <= in_process and "none" not in DEFAULT_MODELS
    assert len(DEFAULT_MODELS) >= 4
    for name in BUILTINS:
        enhancer = create_enhancer(name)
        assert enhancer.name == name and enhancer.batch_size >= 1
        enhancer.check()


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_output_length_dtype_and_alignment(name: str, noisy_15db) -> None:
    clean, noisy = noisy_15db
    enhancer = create_enhancer(name)
    out = enhancer.enhance_one(noisy)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert np.all(np.isfinite(out))
    # Delay compensation: the output lines up with the clean speech to within one sample.
    assert abs(xcorr_lag(clean, out)) <= 1
    # Odd lengths, shorter than any internal frame multiple, come back exactly as long.
    for length in (12_345, 800, 1):
        assert enhancer.enhance_one(noisy[:length]).shape == (length,)


def test_uncompensated_delay_is_what_the_library_adds(noisy_15db) -> None:
    """The alignment test can fail: RNNoise's raw output really is 320 samples late at 16 kHz."""
    clean, noisy = noisy_15db

    class Raw(RNNoise):
        delay = 0

    raw = Raw("rnnoise_raw").enhance_one(noisy)
    assert abs(xcorr_lag(clean, raw) - 320) <= 1


@pytest.mark.parametrize("name", DENOISERS)
def test_denoisers_reduce_white_noise(name: str) -> None:
    clean, noisy = mix(np.random.default_rng(11), 0.0)
    out = create_enhancer(name).enhance_one(noisy)
    assert si_sdr(clean, out) > si_sdr(clean, noisy) + 3.0


def test_builtins_differ_from_each_other(noisy_15db) -> None:
    _, noisy = noisy_15db
    outputs = {name: create_enhancer(name).enhance_one(noisy) for name in DENOISERS}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.max(np.abs(outputs[a] - outputs[b])) > 1e-3, (a, b)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_is_deterministic_and_stateless_between_files(name: str) -> None:
    rng = np.random.default_rng(5)
    _, first = mix(rng, 5.0, 1.0)
    _, second = mix(rng, 5.0, 1.0)
    enhancer = create_enhancer(name, seed=1)
    alone = enhancer.enhance_one(second)
    batch = enhancer.enhance_batch([first, second], file_ids=["a.wav", "b.wav"])
    again = pickle.loads(pickle.dumps(create_enhancer(name, seed=1))).enhance_one(second)
    np.testing.assert_array_equal(batch[1], alone)
    np.testing.assert_array_equal(again, alone)


def test_bad_input_is_reported_per_file_and_the_batch_goes_on() -> None:
    rng = np.random.default_rng(2)
    _, good = mix(rng, 5.0, 1.0)
    bad = good.copy()
    bad[100] = np.nan
    enhancer = create_enhancer("speex")
    results = enhancer.enhance_batch([good, bad, np.zeros(0, np.float32)], file_ids=["g.wav", "n.wav", "e.wav"])
    assert isinstance(results[0], np.ndarray) and results[0].shape == good.shape
    assert isinstance(results[1], EnhancementError) and results[1].file_id == "n.wav"
    assert "NaN" in results[1].reason
    assert isinstance(results[2], EnhancementError) and "empty" in results[2].reason
    with pytest.raises(EnhancementError, match="n.wav"):
        enhancer.enhance_one(bad, file_id="n.wav")


def test_other_sample_rates_come_back_at_their_rate() -> None:
    rng = np.random.default_rng(4)
    audio = speech_like(rng, 1.0, sr=8000)
    out = create_enhancer("webrtc").enhance_one(audio, sr=8000)
    assert out.shape == audio.shape


def test_missing_library_is_reported_by_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RNNoise, "requires", ("no_such_rnnoise_module",))
    with pytest.raises(EnhancerUnavailable, match="no_such_rnnoise_module"):
        create_enhancer("rnnoise").check()


def test_options_and_variants() -> None:
    high = create_enhancer("webrtc_4", {"type": "webrtc", "level": 4})
    assert high.name == "webrtc_4" and high.config["level"] == 4
    with pytest.raises(ModelsConfigError, match="level"):
        create_enhancer("webrtc", {"level": 9})
    with pytest.raises(ModelsConfigError, match="unknown key 'strength'"):
        create_enhancer("webrtc", {"strength": 2})
    with pytest.raises(ModelsConfigError, match="unknown model 'nope'"):
        create_enhancer("nope")
    assert create_enhancer("spectral_gating").config["stationary"] is False
    assert create_enhancer("spectral_gating_stationary").config["stationary"] is True


def test_register_enhancer_adds_by_name_and_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_enhancer("speex")
        class Again(BuiltinEnhancer):
            pass


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "models.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_load_models_config_resolves_variants_and_paths(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
[SGMSE]
repo = "repos/sgmse"
python = "envs/sgmse/bin/python"
ckpt = "/abs/model.ckpt"
N = 30
snr = 1
env = { TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD = "1" }
extra_args = ["--t_eps", "0.03"]

[SGMSE_fast]
type = "SGMSE"
python = "python3"
N = 10

[webrtc_gentle]
type = "webrtc"
level = 1
""",
    )
    models = load_models_config(path)
    assert list(models) == ["SGMSE", "SGMSE_fast", "webrtc_gentle"]
    conf_dir = path.parent.absolute()
    assert models["SGMSE"]["repo"] == str(conf_dir / "repos/sgmse")
    assert models["SGMSE"]["python"] == str(conf_dir / "envs/sgmse/bin/python")
    assert models["SGMSE"]["ckpt"] == "/abs/model.ckpt"
    assert models["SGMSE_fast"]["python"] == "python3"  # a bare name stays a PATH lookup
    assert available_enhancers(models)[-2:] == ["SGMSE_fast", "webrtc_gentle"]
    sgmse = create_enhancer("SGMSE", models["SGMSE"], device="cpu", seed=3)
    assert sgmse.kind == "external" and sgmse.config["snr"] == 1.0 and sgmse.batch_size == 64
    assert create_enhancer("webrtc_gentle", models["webrtc_gentle"]).config["level"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[SGMSE]\nrepo = 'r'\nsteps = 3\n", r"models\.toml: \[SGMSE\] unknown key 'steps'"),
        ("[SGMSE]\nN = 'thirty'\n", r"\[SGMSE\] N must be an integer"),
        ("[StoRM]\nmode = 'fast'\n", r"\[StoRM\] mode = 'fast' is not one of"),
        ("[SGMSE]\nenv = { A = 1 }\n", r"env must be a table of strings"),
        ("[MyModel]\nrepo = 'x'\n", r"\[MyModel\] unknown model 'MyModel'"),
        ("[fast]\ntype = 'SGMSEE'\n", r"\[fast\] unknown type 'SGMSEE' of model 'fast'"),
        ("repo = 'x'\n", r"top-level key 'repo' is not a model table"),
        ("[SGMSE\nrepo = 'x'\n", r"models\.toml: not valid TOML"),
    ],
)
def test_load_models_config_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ModelsConfigError, match=message):
        load_models_config(path)


def test_missing_models_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="models config not found"):
        load_models_config(tmp_path / "absent.toml")


def test_example_models_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "models_config.toml"
    models = load_models_config(example)
    assert {"SGMSE", "StoRM", "CDiffuSE"} <= {m.get("type", n) for n, m in models.items()}
    for name, table in models.items():
        create_enhancer(name, table)

"""Built-in CPU enhancers from maintained libraries (RNNoise, WebRTC NS, Speex NS, spectral gating).

Each runs offline on one file at a time with fresh state per file (so a file's output
never depends on the file before it) and removes the library's algorithmic delay: the
input is padded by the delay, the output is read from `delay` samples on, and the
result has exactly the input's length. The delays below were measured by
cross-correlating speech through each library; tests/test_enhancers.py re-checks them.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from serec.audio import PCM16_SCALE, SAMPLE_RATE, to_pcm16
from serec.enhancers.base import (
    EnhancementError,
    Enhancer,
    EnhancerUnavailable,
    Option,
    batch_file_ids,
    fit_length,
    to_rate,
)
from serec.enhancers.registry import register_enhancer


def run_delay_compensated(
    audio: np.ndarray, frame: int, delay: int, process: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Run a streaming processor whose output lags by `delay` samples; return it aligned.

    The input is zero-padded by `delay` samples (so the tail is flushed out) and up to a
    whole number of `frame`s; `process` must return as many samples as it is given.
    """
    n = audio.size
    total = -(-(n + delay) // frame) * frame
    padded = np.zeros(total, dtype=np.float32)
    padded[:n] = audio
    out = process(padded)
    return np.asarray(out[delay : delay + n], dtype=np.float32)


class BuiltinEnhancer(Enhancer):
    """An in-process enhancer working at `native_sr` on one file at a time."""

    kind: ClassVar[str] = "builtin"
    native_sr: ClassVar[int] = SAMPLE_RATE
    # Python modules the enhancer needs; check() imports them.
    requires: ClassVar[tuple[str, ...]] = ()

    def check(self) -> None:
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or OSError from a missing native library
                raise EnhancerUnavailable(
                    self.name, f"cannot import {module} ({type(exc).__name__}: {exc}); "
                    "install the requirements (make install)"
                ) from exc

    def enhance_batch(
        self,
        audios: Sequence[np.ndarray],
        sr: int = SAMPLE_RATE,
        file_ids: Sequence[str] | None = None,
    ) -> list[np.ndarray | EnhancementError]:
        ids = batch_file_ids(audios, file_ids)
        return [self._enhance_checked(audio, sr, fid) for audio, fid in zip(audios, ids, strict=True)]

    def _enhance_checked(self, audio: np.ndarray, sr: int, fid: str) -> np.ndarray | EnhancementError:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            return EnhancementError(fid, f"{self.name}: expected mono audio, got shape {audio.shape}")
        if audio.size == 0:
            return EnhancementError(fid, f"{self.name}: empty input")
        if not np.all(np.isfinite(audio)):
            return EnhancementError(fid, f"{self.name}: input contains NaN or Inf samples")
        try:
            out = to_rate(self.process(to_rate(audio, sr, self.native_sr)), self.native_sr, sr)
        except Exception as exc:  # a library failing on one file must not stop the batch
            return EnhancementError(fid, f"{self.name} failed: {type(exc).__name__}: {exc}")
        out = fit_length(out, audio.size)
        if not np.all(np.isfinite(out)):
            return EnhancementError(fid, f"{self.name} produced NaN or Inf samples")
        return out

    def process(self, audio: np.ndarray) -> np.ndarray:
        """Enhance one mono float32 signal at `native_sr`; same length, time-aligned."""
        raise NotImplementedError


@register_enhancer("none")
class Passthrough(BuiltinEnhancer):
    """The noisy input unchanged: the 'leave it as it is' choice."""

    def process(self, audio: np.ndarray) -> np.ndarray:
        return audio.copy()


@register_enhancer("rnnoise")
class RNNoise(BuiltinEnhancer):
    """RNNoise (Valin 2018, GRU gains on 22 bands + pitch filter), via pyrnnoise's C library.

    Runs at 48 kHz in 480-sample frames; its output lags the input by two frames.
    Strong on stationary and moderately non-stationary noise, keeps speech natural,
    leaves residual noise at low SNR.
    """

    native_sr: ClassVar[int] = 48_000
    requires = ("pyrnnoise.rnnoise",)
    frame: ClassVar[int] = 480
    delay: ClassVar[int] = 960  # samples at 48 kHz (20 ms; 320 at 16 kHz)

    def process(self, audio: np.ndarray) -> np.ndarray:
        from pyrnnoise import rnnoise

        state = rnnoise.create()
        try:
            def run(padded: np.ndarray) -> np.ndarray:
                # RNNoise works on int16-scaled floats, in place, one frame at a time.
                buf = np.ascontiguousarray(padded * PCM16_SCALE, dtype=np.float32)
                base = buf.ctypes.data
                step = ctypes.sizeof(ctypes.c_float) * self.frame
                for i in range(buf.size // self.frame):
                    ptr = ctypes.cast(base + i * step, ctypes.POINTER(ctypes.c_float))
                    rnnoise.lib.rnnoise_process_frame(state, ptr, ptr)
                return buf / PCM16_SCALE

            return run_delay_compensated(audio, self.frame, self.delay, run)
        finally:
            rnnoise.destroy(state)


@register_enhancer("webrtc")
class WebRTCNoiseSuppression(BuiltinEnhancer):
    """WebRTC's noise suppressor (Wiener-style, noise estimated by quantile tracking).

    16 kHz int16 in 10 ms frames; 96 samples of delay (its 256-sample analysis block
    minus the 160-sample frame). AGC is off, so only suppression (plus WebRTC's fixed
    high-pass) changes the signal. That IIR high-pass advances the phase below about
    200 Hz, so on low-pitched voices a full-band cross-correlation with the clean
    speech can peak 1-5 samples early; from 500 Hz up the alignment is exact.
    """

    requires = ("webrtc_noise_gain",)
    options: ClassVar[dict[str, Option]] = {
        "level": Option(int, 3, "suppression level (maximum attenuation): 1 low (6 dB), "
                        "2 moderate (12 dB), 3 high (15 dB), 4 very high (20 dB)", choices=(1, 2, 3, 4)),
    }
    frame: ClassVar[int] = 160
    delay: ClassVar[int] = 96

    def process(self, audio: np.ndarray) -> np.ndarray:
        from webrtc_noise_gain import AudioProcessor

        processor = AudioProcessor(0, self.config["level"])

        def run(padded: np.ndarray) -> np.ndarray:
            pcm = to_pcm16(padded)
            out = np.empty_like(pcm)
            for i in range(0, pcm.size, self.frame):
                chunk = processor.Process10ms(pcm[i : i + self.frame].tobytes())
                out[i : i + self.frame] = np.frombuffer(chunk.audio, dtype=np.int16)
            return out.astype(np.float32) / PCM16_SCALE

        return run_delay_compensated(audio, self.frame, self.delay, run)


@register_enhancer("speex")
class SpeexNoiseSuppression(BuiltinEnhancer):
    """Speex DSP's preprocessor noise suppression (MMSE-style spectral gain, -15 dB floor).

    16 kHz int16; the output lags by one frame, so the delay equals the frame size.
    """

    requires = ("speexdsp_ns",)
    options: ClassVar[dict[str, Option]] = {
        "frame": Option(int, 160, "frame size in samples at 16 kHz (also the delay)"),
    }

    def process(self, audio: np.ndarray) -> np.ndarray:
        from speexdsp_ns import NoiseSuppression

        frame = self.config["frame"]
        suppressor = NoiseSuppression.create(frame, SAMPLE_RATE)

        def run(padded: np.ndarray) -> np.ndarray:
            pcm = to_pcm16(padded)
            out = np.empty_like(pcm)
            for i in range(0, pcm.size, frame):
                out[i : i + frame] = np.frombuffer(suppressor.process(pcm[i : i + frame].tobytes()), dtype=np.int16)
            return out.astype(np.float32) / PCM16_SCALE

        return run_delay_compensated(audio, frame, frame, run)


@register_enhancer("spectral_gating")
class SpectralGating(BuiltinEnhancer):
    """noisereduce's spectral gating; non-stationary by default.

    The non-stationary gate compares each time-frequency bin with a running (2 s time
    constant) mean of its band, so it follows changing noise (traffic, babble, music)
    but also gates quiet speech; the stationary gate thresholds against one noise
    profile per file. Offline STFT processing with no delay.
    """

    requires = ("noisereduce",)
    options: ClassVar[dict[str, Option]] = {
        "stationary": Option(bool, False, "one noise profile for the whole file instead of a running one"),
        "prop_decrease": Option(float, 1.0, "fraction of the gated noise to remove (0..1)"),
        "time_constant_s": Option(float, 2.0, "non-stationary: time constant of the running noise floor"),
        "n_std_thresh_stationary": Option(float, 1.5, "stationary: threshold in std devs above the noise mean"),
    }

    # noisereduce's STFT (n_fft 1024) fails on shorter inputs; these get zero-padded.
    min_samples: ClassVar[int] = 4096

    def process(self, audio: np.ndarray) -> np.ndarray:
        import noisereduce

        out = noisereduce.reduce_noise(
            y=fit_length(audio, max(audio.size, self.min_samples)),
            sr=self.native_sr,
            stationary=self.config["stationary"],
            prop_decrease=self.config["prop_decrease"],
            time_constant_s=self.config["time_constant_s"],
            n_std_thresh_stationary=self.config["n_std_thresh_stationary"],
            n_jobs=1,
            use_tqdm=False,
        )
        return np.asarray(out[: audio.size], dtype=np.float32)


@register_enhancer("spectral_gating_stationary")
class StationarySpectralGating(SpectralGating):
    """noisereduce's stationary gate: one noise profile per file (mean + 1.5 std per band).

    Better than the running gate on steady noise (hum, engines, air conditioning) and
    on files with long pauses; worse when the noise changes over the file. Measured on
    real mixtures, the two gates win on different files, so both are default models.
    """

    options: ClassVar[dict[str, Option]] = {
        **SpectralGating.options,
        "stationary": Option(bool, True, "one noise profile for the whole file instead of a running one"),
    }

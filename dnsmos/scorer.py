"""DNSMOS P.835 (SIG, BAK, OVR) and P.808 scores for clips and files, on onnxruntime.

The scores are those of Microsoft's `dnsmos_local.py` (and `speechmos`): each 9.01 s window
(one-second hop, short clips tiled) goes through the primary model (raw SIG, BAK, OVR, then
a polynomial) and the P.808 model; a clip's scores are the means over its windows.

Speed: the primary model is a CNN over the log-power spectrogram of 900 frames, so windows
one second (100 frames) apart share most of their computation. We run its convolutional
trunk once over a whole run of consecutive windows and cut each window's feature map out
of it. Only the 3 feature rows at each window edge differ (the window's own zero padding
reaches 3 rows in); those are recomputed from 24-frame strips at the edges. The per-window
tail and the P.808 model then run on windows packed from several clips. The result is the
reference's computation reordered, equal to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from dnsmos.features import FRAMES_PER_HOP, p808_features, primary_frames, run_samples
from dnsmos.models import (
    P808_IO,
    PERSONALIZED,
    PRIMARY_IO,
    REGULAR,
    TRUNK_INPUT,
    default_providers,
    find_model_files,
    load_checked,
    make_session,
    split_primary,
    with_outputs,
)
from dnsmos.windows import (
    HOP_SAMPLES,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    consecutive_runs,
    plan_windows,
    tile,
)

# The trunk pools time by 4: a window's 900 frames become 225 rows, a hop's 100 frames 25.
ROW_FRAMES = 4
WINDOW_ROWS = 225
ROWS_PER_HOP = FRAMES_PER_HOP // ROW_FRAMES
# A window's zero padding changes its first and last 3 rows; row r depends on frames
# 4r - 10 ... 4r + 13, so a 24-frame strip at an edge gives those 3 rows exactly.
EDGE_ROWS = 3
EDGE_FRAMES = 24
# Whole windows through the full primary model (fallback path): about 0.2 GB of
# activations each, and batching does not speed up CPU convolutions, so keep batches small.
WHOLE_WINDOW_BATCH = 2

REFERENCE_COLUMNS = (
    "filename",
    "len_in_sec",
    "sr",
    "num_hops",
    "OVRL_raw",
    "SIG_raw",
    "BAK_raw",
    "OVRL",
    "SIG",
    "BAK",
    "P808_MOS",
)


@dataclass(frozen=True)
class ClipScores:
    """One clip's DNSMOS result: the MOS values, the raw model means and the window count."""

    len_in_sec: float
    num_hops: int
    sig_raw: float
    bak_raw: float
    ovr_raw: float
    sig: float
    bak: float
    ovr: float
    p808: float
    # The mean over windows of the primary model's requested inner activations (DNSMOS(
    # embedding_outputs=...), flattened and concatenated in that order); None when none asked.
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)

    def mos(self) -> dict[str, float]:
        return {"sig": self.sig, "bak": self.bak, "ovr": self.ovr, "p808": self.p808}

    def reference_row(self, filename: str) -> dict[str, Any]:
        """A row of the reference script's CSV (its column names)."""
        return {
            "filename": filename,
            "len_in_sec": self.len_in_sec,
            "sr": SAMPLE_RATE,
            "num_hops": self.num_hops,
            "OVRL_raw": self.ovr_raw,
            "SIG_raw": self.sig_raw,
            "BAK_raw": self.bak_raw,
            "OVRL": self.ovr,
            "SIG": self.sig,
            "BAK": self.bak,
            "P808_MOS": self.p808,
        }


def prepare_audio(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mono float32 at 16 kHz; ValueError for empty, non-finite or badly shaped input.

    A 2-D array is (samples, channels), as soundfile returns it; channels are averaged.
    """
    audio = np.asarray(audio)
    if audio.ndim == 2:
        if audio.shape[1] > audio.shape[0]:
            raise ValueError(
                f"2-D audio must be (samples, channels), got shape {audio.shape}; transpose it"
            )
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be 1-D or (samples, channels), got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("cannot score an empty signal")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or Inf samples")
    if sr != SAMPLE_RATE:
        from serec.audio import resample

        audio = resample(audio, sr, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _run_batches(
    session: ort.InferenceSession, queue: list[tuple[int, np.ndarray]], batch: int, final: bool
) -> list[tuple[int, list[np.ndarray]]]:
    """Run full batches from the queue (and the remainder when final): (clip, [each output
    of the model for that window]) pairs."""
    results = []
    input_name = session.get_inputs()[0].name
    while len(queue) >= batch or (final and queue):
        items = queue[:batch]
        del queue[:batch]
        outputs = session.run(None, {input_name: np.stack([x for _, x in items])})
        results.extend((index, [out[i] for out in outputs]) for i, (index, _) in enumerate(items))
    return results


@dataclass
class _Sessions:
    p808: ort.InferenceSession
    primary: ort.InferenceSession | None  # whole windows, when the graph cannot be split
    trunk: ort.InferenceSession | None
    tail: ort.InferenceSession | None


class _Clip:
    """Per-window outputs of one clip as they arrive."""

    def __init__(self, n_samples: int, num_hops: int) -> None:
        self.n_samples = n_samples
        self.num_hops = num_hops
        self.raw: list[np.ndarray] = []
        self.p808: list[float] = []
        self.embedding: list[np.ndarray] = []


class DNSMOS:
    """DNSMOS scorer; ONNX sessions are created on first use and dropped when pickled.

    Args:
        personalized: use the personalized primary model (pDNSMOS) and its polynomials.
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
        providers: onnxruntime providers (None: CUDA when available, else CPU).
        model_dir: a folder with the ONNX files (None: those bundled with speechmos).
        batch_windows: windows per ONNX call for the per-window models (bounds memory;
            whole windows on the fallback path go at most WHOLE_WINDOW_BATCH at a time).
        max_run_windows: consecutive windows whose trunk runs in one call (bounds memory).
        share_windows: compute overlapping windows' shared trunk once (False: every window
            through the whole primary model, like the reference).
        embedding_outputs: inner tensors of the primary model to return too, averaged over
            the windows as ClipScores.embedding (dnsmos.embedding): scores and activations
            from the same pass.
    """

    def __init__(
        self,
        personalized: bool = False,
        num_threads: int | None = None,
        providers: list[str] | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        batch_windows: int = 8,
        max_run_windows: int = 10,
        share_windows: bool = True,
        embedding_outputs: Sequence[str] = (),
    ) -> None:
        if batch_windows < 1 or max_run_windows < 1:
            raise ValueError("batch_windows and max_run_windows must be >= 1")
        self.personalized = personalized
        self.variant = PERSONALIZED if personalized else REGULAR
        self.num_threads = num_threads
        self.providers = list(providers) if providers is not None else default_providers()
        self.files = find_model_files(personalized, model_dir)
        self.batch_windows = batch_windows
        self.max_run_windows = max_run_windows
        self.share_windows = share_windows
        self.embedding_outputs = tuple(embedding_outputs)
        self._sessions: _Sessions | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"] = None
        return state

    @property
    def sessions(self) -> _Sessions:
        if self._sessions is None:
            self._sessions = self._load()
        return self._sessions

    def _session(self, model: str | bytes) -> ort.InferenceSession:
        return make_session(model, self.num_threads, self.providers)

    def _load(self) -> _Sessions:
        p808 = self._session(load_checked(self.files.p808, *P808_IO).SerializeToString())
        primary = load_checked(self.files.primary, *PRIMARY_IO)
        parts = split_primary(primary, self.embedding_outputs) if self.share_windows else None
        if parts is None:
            whole = with_outputs(primary, self.embedding_outputs)
            return _Sessions(p808, self._session(whole.SerializeToString()), None, None)
        trunk, tail = parts
        return _Sessions(p808, None, self._session(trunk), self._session(tail))

    def score(self, audio: np.ndarray, sr: int) -> dict[str, float]:
        """{'sig', 'bak', 'ovr', 'p808'} MOS of one clip (mono, or (samples, channels))."""
        return self.score_clips([audio], sr)[0].mos()

    def score_batch(self, audios: Sequence[np.ndarray], sr: int = SAMPLE_RATE) -> list[dict[str, float]]:
        """score() for many clips, their windows packed into few ONNX calls."""
        return [clip.mos() for clip in self.score_clips(audios, sr)]

    def score_clips(self, audios: Sequence[np.ndarray], sr: int = SAMPLE_RATE) -> list[ClipScores]:
        """Full results (raw means, num_hops) for many clips; ValueError names a bad clip."""
        prepared = []
        for index, audio in enumerate(audios):
            try:
                prepared.append(prepare_audio(audio, sr))
            except ValueError as exc:
                raise ValueError(f"clip {index}: {exc}") from exc
        sessions = self.sessions
        if sessions.trunk is not None:
            primary_session, primary_batch = sessions.tail, self.batch_windows
        else:
            primary_session, primary_batch = sessions.primary, min(self.batch_windows, WHOLE_WINDOW_BATCH)
        clips: list[_Clip] = []
        primary_queue: list[tuple[int, np.ndarray]] = []
        p808_queue: list[tuple[int, np.ndarray]] = []

        def drain(final: bool) -> None:
            for index, (raw, *inner) in _run_batches(primary_session, primary_queue, primary_batch, final):
                clips[index].raw.append(raw)
                if inner:
                    clips[index].embedding.append(np.concatenate([x.reshape(-1) for x in inner]))
            for index, (p808, *_) in _run_batches(sessions.p808, p808_queue, self.batch_windows, final):
                clips[index].p808.append(float(p808[0]))

        for index, audio in enumerate(prepared):
            plan = plan_windows(audio.shape[0])
            clips.append(_Clip(plan.n_samples, plan.num_hops))
            tiled = tile(audio, plan.tiled_samples)
            for run in consecutive_runs(plan.starts, self.max_run_windows):
                samples = tiled[run[0] : run[0] + run_samples(len(run))]
                p808_queue.extend((index, f) for f in p808_features(samples, len(run)))
                if sessions.trunk is not None:
                    primary_queue.extend((index, m) for m in self._window_maps(samples, len(run)))
                else:
                    primary_queue.extend(
                        (index, samples[w * HOP_SAMPLES : w * HOP_SAMPLES + WINDOW_SAMPLES])
                        for w in range(len(run))
                    )
                drain(final=False)
        drain(final=True)
        return [self._summarise(clip) for clip in clips]

    def _window_maps(self, samples: np.ndarray, n_windows: int) -> list[np.ndarray]:
        """Trunk feature maps [32, 225, 40] of consecutive windows, from one trunk pass."""
        trunk = self.sessions.trunk
        frames = primary_frames(samples, n_windows)
        shared = trunk.run(None, {TRUNK_INPUT: frames[None]})[0][0]
        maps = [
            shared[:, w * ROWS_PER_HOP : w * ROWS_PER_HOP + WINDOW_ROWS].copy()
            for w in range(n_windows)
        ]
        if n_windows > 1:
            window_frames = WINDOW_ROWS * ROW_FRAMES
            starts = [w * FRAMES_PER_HOP for w in range(1, n_windows)]
            ends = [w * FRAMES_PER_HOP + window_frames for w in range(n_windows - 1)]
            strips = np.stack(
                [frames[s : s + EDGE_FRAMES] for s in starts]
                + [frames[e - EDGE_FRAMES : e] for e in ends]
            )
            edges = trunk.run(None, {TRUNK_INPUT: strips})[0]
            for w in range(1, n_windows):
                maps[w][:, :EDGE_ROWS] = edges[w - 1][:, :EDGE_ROWS]
            for w in range(n_windows - 1):
                maps[w][:, -EDGE_ROWS:] = edges[n_windows - 1 + w][:, -EDGE_ROWS:]
        return maps

    def _summarise(self, clip: _Clip) -> ClipScores:
        raw = np.asarray(clip.raw, dtype=np.float64)  # [windows, 3]: SIG, BAK, OVR
        v = self.variant
        return ClipScores(
            len_in_sec=clip.n_samples / SAMPLE_RATE,
            num_hops=clip.num_hops,
            sig_raw=float(raw[:, 0].mean()),
            bak_raw=float(raw[:, 1].mean()),
            ovr_raw=float(raw[:, 2].mean()),
            sig=float(np.polyval(v.sig_poly, raw[:, 0]).mean()),
            bak=float(np.polyval(v.bak_poly, raw[:, 1]).mean()),
            ovr=float(np.polyval(v.ovr_poly, raw[:, 2]).mean()),
            p808=float(np.mean(clip.p808)),
            embedding=np.mean(clip.embedding, axis=0, dtype=np.float64).astype(np.float32) if clip.embedding else None,
        )

    def score_files(
        self, paths: Iterable[str | os.PathLike[str]], files_per_batch: int = 16, validate: bool = True
    ) -> list[dict[str, Any]]:
        """Reference-CSV rows for audio files; a bad file gives {'filename', 'error'}, no raise.

        With `validate` (the rule of every serec step) a silent, too short or non-finite
        file is a bad file; without it, every readable file is scored.
        """
        from serec.audio import AudioError, load_audio

        paths = [str(p) for p in paths]
        rows: list[dict[str, Any]] = []
        for first in range(0, len(paths), files_per_batch):
            loaded: list[dict[str, Any] | np.ndarray] = []
            for path in paths[first : first + files_per_batch]:
                try:
                    loaded.append(prepare_audio(load_audio(path, validate=validate), SAMPLE_RATE))
                except (AudioError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, AudioError) else str(exc)
                    loaded.append({"filename": path, "error": reason})
            scores = iter(self.score_clips([x for x in loaded if isinstance(x, np.ndarray)]))
            for path, item in zip(paths[first : first + files_per_batch], loaded, strict=True):
                rows.append(next(scores).reference_row(path) if isinstance(item, np.ndarray) else item)
        return rows

"""Speech-quality scores of processed audio: DNSMOS, PESQ-WB, STOI, ESTOI, SI-SDR, per-file errors.

`QualityScorer` is the one place that aligns lengths, resamples and scores. What each metric
needs (a clean reference? which rate?) is data in `METRICS`, not code paths. A metric that
fails on a file (PESQ finds no utterance, a silent reference, ...) gives NaN and its error
text for that file; it never stops a run.

Length alignment: when processed and reference lengths differ, both are trimmed to the
shorter one (enhanced outputs keep the noisy length by contract, so this only matters for
outside inputs, e.g. a system that adds or drops a tail).

Long signals: PESQ is computed on consecutive segments of at most 18 s and averaged,
weighted by duration (the `pesq` C code crashes the process on long speech; see `pesq_wb`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from serec.audio import SAMPLE_RATE, SILENCE_PEAK, resample, scale_to_active_level

if TYPE_CHECKING:
    from dnsmos import DNSMOS

MetricFunction = Callable[[np.ndarray, np.ndarray], float]
# Longest signal scored by one call of the `pesq` C code; see pesq_wb.
PESQ_MAX_SEGMENT_S = 18.0


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al., "SDR - half-baked or well done?", 2019).

    Both signals are made zero-mean; the reference is scaled by
    alpha = <estimate, reference> / ||reference||^2 and
    SI-SDR = 10 log10(||alpha reference||^2 / ||estimate - alpha reference||^2).
    +inf for a perfect (scaled) copy; ValueError for unequal lengths or a silent signal.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if estimate.shape != reference.shape or estimate.ndim != 1:
        raise ValueError(f"need two 1-D signals of equal length, got {estimate.shape} and {reference.shape}")
    estimate = estimate - estimate.mean()
    reference = reference - reference.mean()
    reference_energy = float(np.dot(reference, reference))
    if reference_energy == 0.0:
        raise ValueError("reference is silent (constant)")
    if not np.any(estimate):
        raise ValueError("estimate is silent (constant)")
    target = (np.dot(estimate, reference) / reference_energy) * reference
    residual_energy = float(np.sum((estimate - target) ** 2))
    target_energy = float(np.sum(target**2))
    if residual_energy == 0.0:
        return math.inf
    return 10.0 * math.log10(target_energy / residual_energy)


def pesq_segments(n_samples: int, sr: int, max_seconds: float) -> list[slice]:
    """Consecutive, near-equal slices of at most `max_seconds` covering `n_samples` (one if it fits)."""
    count = max(1, math.ceil(n_samples / (max_seconds * sr)))
    bounds = np.linspace(0, n_samples, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def pesq_wb(processed: np.ndarray, reference: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2) at 16 kHz via the `pesq` package, long signals in segments.

    The `pesq` C code keeps at most 50 utterances and writes past its arrays when the
    reference has more (a segfault that takes the process down): its voice activity
    detector needs at least 200 ms of speech and joins pauses of 200 ms or less, so an
    utterance takes more than 0.4 s and a signal of `PESQ_MAX_SEGMENT_S` (18 s) cannot
    hold 50. A signal up to that length is scored whole; a longer one is cut into
    consecutive near-equal segments of at most that length (`pesq_segments`), each is
    scored, and the result is the duration-weighted mean over the segments in which PESQ
    finds speech (a segment whose reference has no utterance is left out). If no segment
    has speech, the NoUtterancesError of the first is raised.
    """
    from pesq import NoUtterancesError, pesq

    scores: list[float] = []
    weights: list[int] = []
    no_speech: NoUtterancesError | None = None
    for part in pesq_segments(reference.shape[0], SAMPLE_RATE, PESQ_MAX_SEGMENT_S):
        try:
            scores.append(float(pesq(SAMPLE_RATE, reference[part], processed[part], "wb")))
        except NoUtterancesError as exc:
            no_speech = no_speech or exc
            continue
        weights.append(part.stop - part.start)
    if not scores:
        assert no_speech is not None
        raise no_speech
    return float(np.average(scores, weights=weights))


def _pystoi(processed: np.ndarray, reference: np.ndarray, extended: bool) -> float:
    from pystoi import stoi

    # pystoi warns and returns 1e-5 when too few non-silent frames remain: that is a
    # failure, not a score.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(reference, processed, SAMPLE_RATE, extended=extended))
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and "Not enough STFT frames" in str(warning.message):
            raise ValueError("too few non-silent frames in the reference for STOI")
    return value


def stoi_score(processed: np.ndarray, reference: np.ndarray) -> float:
    """STOI (Taal et al. 2011) via pystoi, which works at 10 kHz internally."""
    return _pystoi(processed, reference, extended=False)


def estoi_score(processed: np.ndarray, reference: np.ndarray) -> float:
    """Extended STOI (Jensen & Taal 2016) via pystoi."""
    return _pystoi(processed, reference, extended=True)


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is and needs; the scorer decides what to run from these fields.

    A metric has either `dnsmos_key` (one output of the batched DNSMOS pass) or `function`
    (processed, reference) -> value, called on signals at `native_sr`.
    """

    name: str
    needs_reference: bool
    native_sr: int
    description: str
    heading: str  # short column title in printed tables
    higher_is_better: bool = True
    dnsmos_key: str | None = None
    function: MetricFunction | None = None


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("dnsmos_sig", False, SAMPLE_RATE, "DNSMOS P.835 speech quality, MOS 1-5", "SIG", dnsmos_key="sig"),
        MetricSpec("dnsmos_bak", False, SAMPLE_RATE, "DNSMOS P.835 background quality, MOS 1-5", "BAK", dnsmos_key="bak"),
        MetricSpec("dnsmos_ovr", False, SAMPLE_RATE, "DNSMOS P.835 overall quality, MOS 1-5", "OVR", dnsmos_key="ovr"),
        MetricSpec("dnsmos_p808", False, SAMPLE_RATE, "DNSMOS P.808 overall quality, MOS 1-5", "P808", dnsmos_key="p808"),
        MetricSpec("pesq_wb", True, SAMPLE_RATE, "wide-band PESQ, MOS-LQO 1.04-4.64", "PESQ-WB", function=pesq_wb),
        MetricSpec("stoi", True, SAMPLE_RATE, "STOI intelligibility, 0-1", "STOI", function=stoi_score),
        MetricSpec("estoi", True, SAMPLE_RATE, "extended STOI, 0-1", "ESTOI", function=estoi_score),
        MetricSpec("si_sdr", True, SAMPLE_RATE, "scale-invariant SDR, dB", "SI-SDR", function=si_sdr),
    )
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)


@dataclass
class QualityResult:
    """One file's scores: every metric name -> value (NaN if not computed or failed)."""

    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRIC_NAMES, math.nan))
    errors: dict[str, str] = field(default_factory=dict)

    def error_text(self) -> str:
        """All errors as one line, 'metric: reason; ...' (empty if none)."""
        return "; ".join(f"{name}: {reason}" for name, reason in self.errors.items())


def _mono(audio: np.ndarray, what: str) -> np.ndarray:
    """1-D float32; (samples, channels) is averaged. ValueError for empty or non-finite input."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise ValueError(f"{what} must be 1-D or (samples, channels), got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"{what} contains NaN or Inf samples")
    return audio


class QualityScorer:
    """Scores processed audio with the selected metrics; DNSMOS batched across files.

    Args:
        dnsmos: the DNSMOS scorer to use (None: a default `dnsmos.DNSMOS`, created on first
            use, so a scorer can be built cheaply and sent to worker processes).
        metrics: names from METRICS to compute (None: all); the others stay NaN.
        num_threads: onnxruntime threads for the default DNSMOS scorer.
        dnsmos_level_db: score DNSMOS on each signal scaled to this active-speech level
            (dBFS) instead of as it is. DNSMOS rewards quieter output, so comparing
            enhancers at their own levels is partly a loudness contest; None (the
            reference behaviour) scores the signal unchanged. Intrusive metrics are
            level-invariant or computed on the signal as it is.
    """

    def __init__(
        self,
        dnsmos: DNSMOS | None = None,
        metrics: Sequence[str] | None = None,
        num_threads: int | None = None,
        dnsmos_level_db: float | None = None,
    ) -> None:
        names = list(METRIC_NAMES if metrics is None else metrics)
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRIC_NAMES)}")
        self.specs = [METRICS[n] for n in names]
        self.num_threads = num_threads
        self.dnsmos_level_db = dnsmos_level_db
        self._dnsmos = dnsmos

    @property
    def dnsmos(self) -> DNSMOS:
        # Imported and built on first use: intrusive-only scoring needs no ONNX sessions.
        if self._dnsmos is None:
            from dnsmos import DNSMOS

            self._dnsmos = DNSMOS(num_threads=self.num_threads)
        return self._dnsmos

    def score(
        self, processed: np.ndarray, reference: np.ndarray | None = None, sr: int = SAMPLE_RATE
    ) -> QualityResult:
        """Scores of one processed signal; intrusive metrics need `reference` (same rate)."""
        return self.score_batch([processed], [reference], sr)[0]

    def score_batch(
        self,
        processed_list: Sequence[np.ndarray],
        reference_list: Sequence[np.ndarray | None] | None = None,
        sr: int = SAMPLE_RATE,
    ) -> list[QualityResult]:
        """Scores of many signals (references optional, per file); never raises per file."""
        if reference_list is None:
            reference_list = [None] * len(processed_list)
        if len(reference_list) != len(processed_list):
            raise ValueError(f"{len(processed_list)} signals but {len(reference_list)} references")
        results = [QualityResult() for _ in processed_list]
        # signals[i][rate] = (processed, reference or None) at that rate, aligned.
        signals: list[dict[int, tuple[np.ndarray, np.ndarray | None]] | None] = []
        for result, processed, reference in zip(results, processed_list, reference_list, strict=True):
            signals.append(self._prepare(result, processed, reference, sr))

        dnsmos_specs = [s for s in self.specs if s.dnsmos_key is not None]
        if dnsmos_specs:
            self._score_dnsmos(results, signals, dnsmos_specs)
        for result, prepared in zip(results, signals, strict=True):
            if prepared is None:
                continue
            for spec in self.specs:
                if spec.function is None:
                    continue
                processed, reference = prepared[spec.native_sr]
                if reference is None:
                    continue
                try:
                    value = float(spec.function(processed, reference))
                    if math.isnan(value):
                        raise ValueError("the metric returned NaN")
                    result.values[spec.name] = value
                except Exception as exc:  # any metric failure is recorded, never fatal
                    result.errors[spec.name] = f"{type(exc).__name__}: {exc}"
        return results

    def _prepare(
        self, result: QualityResult, processed: np.ndarray, reference: np.ndarray | None, sr: int
    ) -> dict[int, tuple[np.ndarray, np.ndarray | None]] | None:
        try:
            processed = _mono(processed, "processed audio")
        except ValueError as exc:
            for spec in self.specs:
                result.errors[spec.name] = str(exc)
            return None
        if reference is not None:
            try:
                reference = _mono(reference, "reference")
                if float(np.max(np.abs(reference))) <= SILENCE_PEAK:
                    raise ValueError("reference is silent (peak at or below -80 dBFS)")
            except ValueError as exc:
                for spec in self.specs:
                    if spec.needs_reference:
                        result.errors[spec.name] = str(exc)
                reference = None
        if reference is not None and reference.shape[0] != processed.shape[0]:
            n = min(reference.shape[0], processed.shape[0])
            processed, reference = processed[:n], reference[:n]
        by_rate: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for rate in {spec.native_sr for spec in self.specs}:
            by_rate[rate] = (
                resample(processed, sr, rate),
                None if reference is None else resample(reference, sr, rate),
            )
        return by_rate

    def _score_dnsmos(
        self,
        results: list[QualityResult],
        signals: list[dict[int, tuple[np.ndarray, np.ndarray | None]] | None],
        specs: list[MetricSpec],
    ) -> None:
        rate = specs[0].native_sr
        todo = [i for i, prepared in enumerate(signals) if prepared is not None]
        clips = [signals[i][rate][0] for i in todo]
        if self.dnsmos_level_db is not None:
            clips = [scale_to_active_level(clip, self.dnsmos_level_db, rate) for clip in clips]
        try:
            scores = self.dnsmos.score_batch(clips, rate)
        except Exception:
            # Attribute the failure: score one by one, recording which files fail.
            scores = []
            for i, clip in zip(todo, clips, strict=True):
                try:
                    scores.append(self.dnsmos.score(clip, rate))
                except Exception as exc:  # recorded per file and metric, never fatal
                    scores.append(None)
                    for spec in specs:
                        results[i].errors[spec.name] = f"{type(exc).__name__}: {exc}"
        for i, score in zip(todo, scores, strict=True):
            if score is not None:
                for spec in specs:
                    results[i].values[spec.name] = score[spec.dnsmos_key]

"""Speech + noise mixing over a corpus: step 1 of the workflow (sources, speaker splits, names,
the parallel run; serec/snr_mixing.py makes each mixture at its active-speech SNR).

Every mixture is a pure function of (seed, index) and the sorted source lists, so the
number of worker processes never changes a byte of the output.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serec.audio import (
    SAMPLE_RATE,
    AudioError,
    active_mask,
    list_audio_files,
    load_audio,
    write_wav,
)
from serec.exitcodes import ExitStatus, partial_or_ok
from serec.fileio import write_csv_atomic
from serec.lock import output_lock
from serec.parallel import ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units
from serec.runinfo import write_run_json
from serec.snr_mixing import (
    DEFAULT_TARGET_LEVEL_DB,
    Decibels,
    mix_at_snr,
    noise_segment,
    noise_usable_under_speech,
)

MAX_NOISE_DRAWS = 10

DEFAULT_SNR_LEVELS: tuple[float, ...] = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
DEFAULT_TEST_FRACTION = 0.2
# Corpus names are <dataset>_<speaker>_<utterance>.wav: the speaker is the second field.
DEFAULT_SPEAKER_REGEX = r"^[^_]+_([^_]+)_"

METADATA_COLUMNS = (
    "file",
    "clean_source",
    "noise_source",
    "speaker",
    "snr_db",
    "measured_snr_db",
    "noise_offset_s",
    "target_level_db",
    "clipped",
    "split",
    "seed",
)
SKIPPED_COLUMNS = ("file", "role", "reason")

# Independent random streams derived from --seed (SeedSequence spawn keys).
_MIXTURE_STREAM = 0
_SPLIT_STREAM = 1
_NOISE_SPLIT_STREAM = 2
# Per-worker source cache budget: 64 M float32 samples (256 MB, about 70 min of audio).
_CACHE_SAMPLES = 64 * 2**20

log = logging.getLogger(__name__)


class MixingError(ValueError):
    """A mixture that cannot be made from its sources; carries the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ---------------------------------------------------------------- seeds, speakers, names


def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *key)))


def mixture_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of mixture `index`: independent of worker count and order."""
    return _rng(seed, _MIXTURE_STREAM, index)


def compile_speaker_regex(pattern: str) -> re.Pattern[str]:
    """Compile `--speaker_regex`; ValueError unless it is valid with exactly one group."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--speaker_regex {pattern!r} is not a valid regex: {exc}") from exc
    if compiled.groups != 1:
        raise ValueError(
            f"--speaker_regex {pattern!r} has {compiled.groups} capture groups; it needs "
            "exactly one, around the speaker id"
        )
    return compiled


def speaker_of(path: str | Path, pattern: re.Pattern[str]) -> str:
    """The speaker id: the regex's group, searched in the file name (not the folders)."""
    name = Path(path).name
    match = pattern.search(name)
    if match is None or not match.group(1):
        raise MixingError(
            path,
            f"file name does not match --speaker_regex {pattern.pattern!r} "
            "(pass a regex whose one group captures the speaker id)",
        )
    return match.group(1)


def split_speakers(
    speakers: Iterable[str], test_fraction: float, seed: int, stream: int = _SPLIT_STREAM
) -> dict[str, str]:
    """Assign each speaker (or other key) to `train` or `test`; `test_fraction` go to test.

    Deterministic in (keys, fraction, seed, stream). With at least two keys and
    0 < fraction < 1, both splits get at least one key. Noise recordings are split
    with the same rule on their own random stream.
    """
    unique = sorted(set(speakers))
    n = len(unique)
    n_test = math.floor(test_fraction * n + 0.5)
    if n >= 2 and 0 < test_fraction < 1:
        n_test = min(max(n_test, 1), n - 1)
    order = _rng(seed, stream).permutation(n)
    test = {unique[i] for i in order[:n_test]}
    return {spk: ("test" if spk in test else "train") for spk in unique}


def noise_pools(
    noise_files: Sequence[Path], noise_test_fraction: float | None, seed: int
) -> dict[str, list[Path]]:
    """The noise recordings each split draws from: all of them, or disjoint sets.

    With `noise_test_fraction` None both splits share every recording (test mixtures may
    reuse training noises); otherwise that share of the recordings is test-only and the
    rest train-only, so no test noise recording is heard in training.
    """
    if noise_test_fraction is None:
        return {"train": list(noise_files), "test": list(noise_files)}
    split_of = split_speakers([str(p) for p in noise_files], noise_test_fraction, seed, _NOISE_SPLIT_STREAM)
    return {
        split: [p for p in noise_files if split_of[str(p)] == split] for split in ("train", "test")
    }


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", path.stem).strip("_.")[:64] or "audio"


def mixture_name(clean: Path, noise: Path, snr_db: Decibels, index: int) -> str:
    """`<clean stem>__<noise stem>__snr<+g>_<index:05d>.wav`, restricted to [A-Za-z0-9._+-]."""
    return f"{_safe_stem(clean)}__{_safe_stem(noise)}__snr{snr_db:+g}_{index:05d}.wav"


# ---------------------------------------------------------------- the mixing run


@dataclass(frozen=True)
class MixingConfig:
    """Everything that determines a mixing run; field names match the CLI flags."""

    clean_dir: tuple[Path, ...]
    noise_dir: tuple[Path, ...]
    output_dir: Path
    num_mixtures: int | None = None
    snr_levels: tuple[float, ...] = DEFAULT_SNR_LEVELS
    snr_range: tuple[float, float] | None = None
    target_level_db: Decibels = DEFAULT_TARGET_LEVEL_DB
    target_level_jitter: Decibels = 0.0
    seed: int = 0
    test_fraction: float = DEFAULT_TEST_FRACTION
    noise_test_fraction: float | None = None
    speaker_regex: str = DEFAULT_SPEAKER_REGEX
    save_noise: bool = False
    num_workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean_dir", tuple(Path(p) for p in self.clean_dir))
        object.__setattr__(self, "noise_dir", tuple(Path(p) for p in self.noise_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "snr_levels", tuple(float(s) for s in self.snr_levels))
        if not self.clean_dir or not self.noise_dir:
            raise ValueError("need at least one --clean_dir and one --noise_dir")
        if self.num_mixtures is not None and self.num_mixtures < 1:
            raise ValueError(f"--num_mixtures must be >= 1, got {self.num_mixtures}")
        if self.snr_range is not None:
            lo, hi = self.snr_range
            if not lo <= hi:
                raise ValueError(f"--snr_range needs LO <= HI, got {lo} {hi}")
        elif not self.snr_levels:
            raise ValueError("--snr_levels needs at least one value")
        if not all(math.isfinite(s) for s in (*self.snr_levels, *(self.snr_range or ()))):
            raise ValueError("SNRs must be finite numbers")
        if self.target_level_jitter < 0:
            raise ValueError(f"--target_level_jitter must be >= 0, got {self.target_level_jitter}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"--test_fraction must be in [0, 1], got {self.test_fraction}")
        if self.noise_test_fraction is not None and not 0.0 <= self.noise_test_fraction <= 1.0:
            raise ValueError(f"--noise_test_fraction must be in [0, 1], got {self.noise_test_fraction}")
        if self.num_workers < 1:
            raise ValueError(f"--num_workers must be >= 1, got {self.num_workers}")
        compile_speaker_regex(self.speaker_regex)


@dataclass(frozen=True)
class MixtureTask:
    index: int
    clean_source: Path
    speaker: str
    split: str


@dataclass
class MixingSummary:
    """What a run produced: metadata rows, skipped sources/mixtures, and where they went."""

    output_dir: Path
    requested: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    stray_files: int = 0

    @property
    def made(self) -> int:
        return len(self.rows)

    @property
    def exit_status(self) -> ExitStatus:
        """OK: everything made, nothing skipped; PARTIAL: output written but something
        skipped; USAGE: nothing could be made."""
        if self.made == 0:
            return ExitStatus.USAGE
        return partial_or_ok(len(self.skipped) + self.requested - self.made)


class _SourceCache:
    """Loaded, validated sources kept in memory up to a sample budget (least recently used out)."""

    def __init__(self, max_samples: int = _CACHE_SAMPLES) -> None:
        self.max_samples = max_samples
        self._items: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._samples = 0

    def load(self, path: Path) -> np.ndarray:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        audio = load_audio(path)
        self._items[path] = audio
        self._samples += audio.size
        while self._samples > self.max_samples and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._samples -= dropped.size
        return audio


class _Mixer:
    """Makes one mixture per task; one instance per worker process."""

    def __init__(self, config: MixingConfig, noise_files: Sequence[Path]) -> None:
        self.config = config
        self.cache = _SourceCache()
        self.use_noise(noise_files)

    def use_noise(self, noise_files: Sequence[Path]) -> None:
        self.noise_by_split = noise_pools(noise_files, self.config.noise_test_fraction, self.config.seed)

    def check_source(self, item: tuple[str, Path]) -> tuple[str, Path, str | None]:
        role, path = item
        try:
            self.cache.load(path)
        except AudioError as exc:
            return role, path, exc.reason
        return role, path, None

    def _draw_snr(self, rng: np.random.Generator) -> Decibels:
        if self.config.snr_range is not None:
            return round(float(rng.uniform(*self.config.snr_range)), 2)
        return float(self.config.snr_levels[int(rng.integers(len(self.config.snr_levels)))])

    def make(self, task: MixtureTask) -> tuple[int, dict[str, Any] | None, dict[str, str] | None]:
        cfg = self.config
        rng = mixture_rng(cfg.seed, task.index)
        pool = self.noise_by_split[task.split]
        if not pool:
            return task.index, None, {
                "file": f"mixture {task.index:05d}", "role": "mixture",
                "reason": f"no noise recording in the {task.split} split (--noise_test_fraction "
                f"{cfg.noise_test_fraction} of {sum(map(len, self.noise_by_split.values()))} recordings)",
            }
        noise_path = pool[int(rng.integers(len(pool)))]
        snr_db = self._draw_snr(rng)
        jitter = float(rng.uniform(-cfg.target_level_jitter, cfg.target_level_jitter))
        target_level_db = round(cfg.target_level_db + jitter, 3)
        name = mixture_name(task.clean_source, noise_path, snr_db, task.index)
        try:
            clean = self.cache.load(task.clean_source)
            noise = self.cache.load(noise_path)
            mask = active_mask(clean)
            for _ in range(MAX_NOISE_DRAWS):
                segment, offset = noise_segment(noise, len(clean), rng)
                if noise_usable_under_speech(segment, mask):
                    break
            else:
                raise MixingError(
                    noise_path,
                    f"silent or far quieter than elsewhere under the speech of "
                    f"{task.clean_source} at {MAX_NOISE_DRAWS} random offsets",
                )
            mixture = mix_at_snr(clean, segment, snr_db, target_level_db)
        except (AudioError, MixingError) as exc:
            return task.index, None, {"file": name, "role": "mixture", "reason": str(exc)}

        out = cfg.output_dir
        write_wav(out / "clean" / name, mixture.clean)
        if cfg.save_noise:
            write_wav(out / "noise" / name, mixture.noise)
        # noisy last: a noisy file on disk means its clean reference is complete.
        write_wav(out / "noisy" / name, mixture.noisy)
        row = {
            "file": name,
            "clean_source": str(task.clean_source),
            "noise_source": str(noise_path),
            "speaker": task.speaker,
            "snr_db": snr_db,
            "measured_snr_db": round(mixture.measured_snr_db, 4) + 0.0,  # no "-0.0"
            "noise_offset_s": round(offset / SAMPLE_RATE, 6),
            "target_level_db": target_level_db,
            "clipped": mixture.clipped,
            "split": task.split,
            "seed": cfg.seed,
        }
        return task.index, row, None


class _MixingJob(ChunkJob[Any]):
    """One phase of mixing on a chunk: unit key `check_source` ((role, path) items) or `make`."""

    # Bad sources and mixtures are recorded per item by _Mixer; anything else is a bug.
    recoverable = ()

    def __init__(self, config: MixingConfig, noise_files: Sequence[Path]) -> None:
        self.config = config
        self.noise_files = list(noise_files)

    def setup(self, threads: int | None) -> None:
        # In this process both phases share one mixer, so each source is loaded once.
        if getattr(self, "_mixer", None) is None:
            self._mixer = _Mixer(self.config, self.noise_files)
        else:
            self._mixer.use_noise(self.noise_files)

    def process(self, unit: WorkUnit[Any]) -> list[Any]:
        return [getattr(self._mixer, unit.key)(item) for item in unit.items]

    def failed(self, unit: WorkUnit[Any], reason: str) -> list[Any]:
        if unit.key == "check_source":
            return [(role, path, reason) for role, path in unit.items]
        return [
            (task.index, None, {"file": f"mixture {task.index} of {task.clean_source}", "role": "mixture",
                                "reason": reason})
            for task in unit.items
        ]


def _run_phase(job: _MixingJob, method: str, items: Sequence[Any], desc: str) -> list[Any]:
    """Apply a _Mixer method to every item, in this process (one worker) or in worker processes."""
    results: list[Any] = []
    # Small chunks keep the progress bar moving; a task is milliseconds of work either way.
    size = max(1, min(8, len(items) // (4 * job.config.num_workers)))
    run_units(job, chunk_units(method, items, size), LocalBackend(job.config.num_workers),
              lambda _unit, rows: results.extend(rows), desc=desc, leave=False)
    return results


def _unique_files(roots: Sequence[Path]) -> list[Path]:
    seen: dict[Path, Path] = {}
    for path in list_audio_files(roots):
        seen.setdefault(path.resolve(), path)
    return sorted(seen.values())


def _remove_stale_outputs(output_dir: Path) -> None:
    # A metadata.csv left by an earlier run would describe files this run overwrites.
    for name in ("metadata.csv", "skipped.csv"):
        (output_dir / name).unlink(missing_ok=True)
    # Temp files a SIGKILL left behind (atomic_path names them .<name>.<random>.tmp.wav).
    for sub in ("clean", "noise", "noisy"):
        for tmp in (output_dir / sub).glob(".*.tmp.wav"):
            tmp.unlink(missing_ok=True)


def _count_stray_files(output_dir: Path, names: set[str]) -> int:
    return sum(
        1
        for sub in ("clean", "noise", "noisy")
        for path in (output_dir / sub).glob("*.wav")
        if path.name not in names
    )


def _skip(role: str, path: Path | str, reason: str) -> dict[str, str]:
    log.warning("skipping %s %s: %s", role, path, reason)
    return {"file": str(path), "role": role, "reason": reason}


def run_mixing(config: MixingConfig) -> MixingSummary:
    """Validate the sources, make the mixtures, write metadata.csv, skipped.csv and run.json.

    Bad sources (unreadable, silent, too short, NaN, name not matching the speaker
    regex) and mixtures that cannot be made are logged, recorded in skipped.csv and left
    out; the run goes on. metadata.csv is written once at the end, atomically. With one
    worker everything runs in this process and each source is loaded once; with more,
    each worker loads a source at most once. Holds the output folder's lock for the run
    (OutputLocked if another run holds it).
    """
    with output_lock(config.output_dir, "mixing"):
        return _mix_locked(config)


def _mix_locked(config: MixingConfig) -> MixingSummary:
    out = config.output_dir
    _remove_stale_outputs(out)
    pattern = compile_speaker_regex(config.speaker_regex)
    clean_files = _unique_files(config.clean_dir)
    noise_files = _unique_files(config.noise_dir)
    job = _MixingJob(config, [])

    sources = [("clean", p) for p in clean_files] + [("noise", p) for p in noise_files]
    checked = _run_phase(job, "check_source", sources, "checking sources")
    bad = {path: reason for _role, path, reason in checked if reason is not None}
    skipped = [_skip(role, path, bad[path]) for role, path in sources if path in bad]

    speakers: dict[Path, str] = {}
    for path in clean_files:
        if path not in bad:
            try:
                speakers[path] = speaker_of(path, pattern)
            except MixingError as exc:
                skipped.append(_skip("clean", path, exc.reason))
    good_clean = sorted(speakers)
    good_noise = [p for p in noise_files if p not in bad]

    requested = config.num_mixtures if config.num_mixtures is not None else len(good_clean)
    summary = MixingSummary(output_dir=out, requested=requested, skipped=skipped)
    if not good_clean or not good_noise:
        log.error("no usable %s files: nothing to mix", "clean" if not good_clean else "noise")
    else:
        job.noise_files = good_noise
        split_of = split_speakers(speakers.values(), config.test_fraction, config.seed)
        tasks = []
        for index in range(requested):
            clean = good_clean[index % len(good_clean)]
            tasks.append(MixtureTask(index, clean, speakers[clean], split_of[speakers[clean]]))
        results = _run_phase(job, "make", tasks, "mixing")
        for _index, row, skip in sorted(results, key=lambda result: result[0]):
            if row is not None:
                summary.rows.append(row)
            else:
                skipped.append(_skip(skip["role"], skip["file"], skip["reason"]))

    write_csv_atomic(out / "skipped.csv", SKIPPED_COLUMNS, skipped)
    write_csv_atomic(out / "metadata.csv", METADATA_COLUMNS, summary.rows)
    summary.stray_files = _count_stray_files(out, {row["file"] for row in summary.rows})
    if summary.stray_files:
        log.warning(
            "%d wav files under %s are not listed in metadata.csv (left by an earlier run "
            "with other flags?)",
            summary.stray_files,
            out,
        )
    write_run_json(
        out,
        asdict(config),
        mixtures_requested=summary.requested,
        mixtures_made=summary.made,
        skipped=len(skipped),
    )
    return summary

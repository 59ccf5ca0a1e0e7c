"""The Enhancer interface, its errors, and the option schema every enhancer declares."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from serec.audio import SAMPLE_RATE, resample


class EnhancerUnavailable(Exception):
    """An enhancer that cannot run here (missing package, repo, checkpoint, Python or CUDA)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"enhancer {name!r} is unavailable: {reason}")


class EnhancementError(Exception):
    """One input that an enhancer could not process; carries the file id and the reason."""

    def __init__(self, file_id: str, reason: str) -> None:
        self.file_id = file_id
        self.reason = reason
        super().__init__(f"{file_id}: {reason}")


class ModelsConfigError(ValueError):
    """A models config (TOML file or dict) with an unknown key, a wrong type or a bad value."""


@dataclass(frozen=True)
class Option:
    """One configuration key of an enhancer: accepted type, default, and what it does."""

    kind: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    # "path": a file or folder, resolved against the config file's folder;
    # "command": a bare name is looked up on PATH, anything with a "/" is a path.
    path: str | None = None
    # False for keys that change how a model runs but not what it outputs (batch size,
    # log file): changing them never makes earlier outputs stale.
    affects_output: bool = True


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML integers are acceptable where a float is asked for; bools are not numbers here.
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    if not isinstance(value, kinds):
        return False
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return True


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true/false)",
             list: "a list of strings", dict: "a table of strings"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class Enhancer(ABC):
    """A speech-enhancement model: a batch of 16 kHz mono inputs in, same-length outputs out.

    Outputs are float32, exactly as long as their input and time-aligned with it (any
    algorithmic delay is compensated), so they can be scored against the clean reference
    sample by sample.

    Per-file failures: `enhance_batch` returns one item per input, either the enhanced
    array or an `EnhancementError` instance for an input it could not process; it does
    not raise for a single bad input, so a caller records per-file errors from the list.
    External adapters run one subprocess per batch; when that subprocess fails, every
    input without a valid output gets an EnhancementError with the exit code and the
    tail of stderr, while outputs already written before the failure are kept.
    `enhance_one` is the single-file form that raises instead.
    `EnhancerUnavailable` (raised by `check`, and by `enhance_batch` if `check` was
    skipped) means the model cannot run at all; call `check()` before any work.

    Instances are cheap and picklable (name + options + device + seed); heavy state is
    created lazily inside the process that uses it, so they can be sent to workers.
    """

    kind: ClassVar[str] = "builtin"
    # Options common to every enhancer; subclasses extend `options`.
    common_options: ClassVar[dict[str, Option]] = {
        "type": Option(str, None, "which enhancer implementation a config table uses"),
        "batch_size": Option(int, 1, "files per enhance_batch call the driver should send",
                             affects_output=False),
    }
    options: ClassVar[dict[str, Option]] = {}

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.name = name
        self.device = device
        self.seed = seed
        self.config = validate_options(type(self), name, config or {}, source="config")
        self.batch_size: int = self.config["batch_size"]
        if self.batch_size < 1:
            raise ModelsConfigError(f"config: [{name}] batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def all_options(cls) -> dict[str, Option]:
        return {**cls.common_options, **cls.options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, seed={self.seed})"

    def output_settings(self) -> dict[str, Any]:
        """The resolved options that shape the outputs (implementation and values), for run.json."""
        options = self.all_options()
        settings = {k: v for k, v in self.config.items() if options[k].affects_output}
        settings["type"] = self.config["type"] or self.name
        return settings

    def __getstate__(self) -> dict[str, Any]:
        # Lazily built native state (library handles, cached checks) stays in its process.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @abstractmethod
    def check(self) -> None:
        """Raise EnhancerUnavailable with a clear reason if this enhancer cannot run here."""

    @abstractmethod
    def enhance_batch(
        self,
        audios: Sequence[np.ndarray],
        sr: int = SAMPLE_RATE,
        file_ids: Sequence[str] | None = None,
    ) -> list[np.ndarray | EnhancementError]:
        """Enhance each input; one float32 array (same length) or EnhancementError per input."""

    def enhance_one(self, audio: np.ndarray, sr: int = SAMPLE_RATE, file_id: str = "input") -> np.ndarray:
        """Enhance one input; raises EnhancementError if it cannot be processed."""
        result = self.enhance_batch([audio], sr=sr, file_ids=[file_id])[0]
        if isinstance(result, EnhancementError):
            raise result
        return result


def validate_options(
    cls: type[Enhancer], name: str, config: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """Check a config table against the enhancer's options; return it merged with defaults."""
    allowed = cls.all_options()
    for key, value in config.items():
        if key not in allowed:
            raise ModelsConfigError(
                f"{source}: [{name}] unknown key {key!r} for {cls.__name__}; "
                f"allowed keys: {', '.join(sorted(allowed))}"
            )
        option = allowed[key]
        if not _type_ok(value, option.kind):
            raise ModelsConfigError(
                f"{source}: [{name}] {key} must be {_kind_name(option.kind)}, got {value!r}"
            )
        if option.choices is not None and value not in option.choices:
            raise ModelsConfigError(
                f"{source}: [{name}] {key} = {value!r} is not one of {list(option.choices)}"
            )
    # Copies, so that editing one enhancer's list or table never changes the defaults.
    merged = {key: copy.deepcopy(option.default) for key, option in allowed.items()}
    merged.update(config)
    for key, option in allowed.items():
        if isinstance(option.kind, type) and option.kind is float and isinstance(merged[key], int):
            merged[key] = float(merged[key])
    return merged


def batch_file_ids(audios: Sequence[np.ndarray], file_ids: Sequence[str] | None) -> list[str]:
    """The ids to report a batch's per-file errors under ("input N" when none are given)."""
    ids = list(file_ids) if file_ids is not None else [f"input {i}" for i in range(len(audios))]
    if len(ids) != len(audios):
        raise ValueError(f"{len(audios)} inputs but {len(ids)} file ids")
    return ids


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad the end of a signal to exactly `length` samples (float32)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.size >= length:
        return audio[:length]
    return np.concatenate([audio, np.zeros(length - audio.size, dtype=np.float32)])


def to_rate(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample between rates; the result has exactly round(len * sr_out / sr_in) samples."""
    if sr_in == sr_out:
        return np.asarray(audio, dtype=np.float32)
    return fit_length(resample(audio, sr_in, sr_out), round(audio.size * sr_out / sr_in))

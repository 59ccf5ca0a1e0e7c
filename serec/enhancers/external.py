"""Adapters that run upstream SE repositories (SGMSE, StoRM, CDiffuSE) as subprocesses.

Each batch is staged as 16 kHz 16-bit WAVs with flat, safe names in a temp folder, the
upstream command lines (docs/upstream.md sections 2-4) run once per batch with the
repository as working directory and the configured Python, and the outputs are read
back, validated (present, finite, input length within 20 ms) and resampled to 16 kHz.
A missing repo, script, checkpoint, Python or CUDA is reported by `check()` before
any work starts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from serec.audio import SAMPLE_RATE, AudioError, load_audio, write_wav
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

LAUNCHER = Path(__file__).with_name("launch.py")
# An output may differ from its input by a few samples (resampling from the model rate,
# frame padding); more than this means the wrong file or a truncated write.
LENGTH_TOLERANCE_S = 0.02
TAIL_LINES = 20
TAIL_CHARS = 3000
CUDA_CHECK_TIMEOUT_S = 300

# (python, repo, env) -> None if CUDA works, else the reason; checked once per process.
_cuda_checks: dict[tuple[str, str, tuple[tuple[str, str], ...]], str | None] = {}


@dataclass(frozen=True)
class Step:
    """One upstream command: a script (relative to the repo) and its arguments."""

    script: str
    args: list[str]
    seeded: bool = True


def output_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last lines of a process's output, progress-bar carriage returns treated as line ends."""
    kept = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    tail = "\n".join(kept[-lines:])
    return tail[-chars:]


def staged_name(index: int, file_id: str) -> str:
    """A flat, unique, shell- and glob-safe WAV name for the index-th input of a batch."""
    stem = re.sub(r"\.(wav|flac)$", "", file_id, flags=re.IGNORECASE)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return f"{index:05d}_{safe or 'input'}.wav"


class ExternalEnhancer(Enhancer):
    """Runs an upstream repository's inference scripts on a whole batch per subprocess.

    Subclasses give the scripts, the command lines and where outputs land. Outputs
    written before a failing subprocess died are kept; inputs without a valid output
    get an EnhancementError with the exit status and the tail of the process output
    (stdout and stderr, one stream; a Python traceback is its last lines).
    """

    kind: ClassVar[str] = "external"
    scripts: ClassVar[tuple[str, ...]] = ()
    default_env: ClassVar[dict[str, str]] = {}
    # Why CUDA is needed, for the message when it is missing; empty when CPU works.
    cuda_only_reason: ClassVar[str] = ""
    common_options: ClassVar[dict[str, Option]] = {
        **Enhancer.common_options,
        "batch_size": Option(int, 64, "files per subprocess (the model is loaded once per batch)", affects_output=False),
        "repo": Option(str, None, "clone of the upstream repository (working directory of its scripts)", path="path"),
        "python": Option(str, "python", "Python of the repository's own environment", path="command", affects_output=False),
        "extra_args": Option(list, [], "more arguments appended to the inference command line"),
        "env": Option(dict, {}, "environment variables for the subprocess"),
        "timeout_s": Option(float, 0.0, "kill a batch subprocess after this many seconds (0: no limit)", affects_output=False),
        "seeded": Option(bool, True, "seed random/numpy/torch with --seed before the script runs "
                         "(through launch.py; argv and sys.path are what `python SCRIPT` gives)"),
        "log_file": Option(str, None, "append every subprocess's output to this file", path="path", affects_output=False),
    }

    def __init__(
        self, name: str, config: Mapping[str, Any] | None = None, device: str = "cpu", seed: int = 0
    ) -> None:
        super().__init__(name, config, device=device, seed=seed)
        # The scripts run with the repo as working directory: make every path absolute.
        for key, option in self.all_options().items():
            value = self.config[key]
            if value and (option.path == "path" or (option.path == "command" and "/" in value)):
                self.config[key] = str(Path(value).expanduser().absolute())
        self.log_path: Path | None = Path(self.config["log_file"]) if self.config["log_file"] else None

    def model_problem(self) -> str | None:
        """Why the configured checkpoint / model cannot be used, or None."""
        return None

    def settings_problem(self) -> str | None:
        """Why the sampler settings cannot work on this device, or None."""
        return None

    def uses_cuda(self) -> bool:
        return bool(self.cuda_only_reason)

    def steps(self, work: Path, in_dir: Path) -> list[Step]:
        raise NotImplementedError

    def output_path(self, work: Path, name: str) -> Path:
        raise NotImplementedError

    @property
    def repo(self) -> Path | None:
        return Path(self.config["repo"]) if self.config["repo"] else None

    def python_executable(self) -> str | None:
        """The configured Python as an absolute path, or None if it cannot be found."""
        python = self.config["python"]
        if "/" not in python:
            return shutil.which(python)
        path = Path(python)
        return str(path.absolute()) if path.is_file() and os.access(path, os.X_OK) else None

    def subprocess_env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.default_env, **self.config["env"]}

    def check(self) -> None:
        repo = self.repo
        if repo is None:
            raise EnhancerUnavailable(
                self.name, f"no repository configured: set repo = \"/path/to/clone\" in the [{self.name}] "
                "table of --models_config (see examples/models_config.toml)"
            )
        if not repo.is_dir():
            raise EnhancerUnavailable(self.name, f"repository folder {repo} does not exist")
        for script in self.scripts:
            if not (repo / script).is_file():
                raise EnhancerUnavailable(
                    self.name, f"{repo / script} not found: is {repo} a clone of the {type(self).__name__} repository?"
                )
        python = self.python_executable()
        if python is None:
            raise EnhancerUnavailable(
                self.name, f"Python executable {self.config['python']!r} not found (set python = "
                "\"/path/to/env/bin/python\" of the environment that has the repository's requirements)"
            )
        problem = self.model_problem() or self.settings_problem()
        if problem:
            raise EnhancerUnavailable(self.name, problem)
        if self.uses_cuda():
            reason = self._cuda_problem(python, repo)
            if reason:
                raise EnhancerUnavailable(self.name, reason)
        self._checked = True

    def _cuda_problem(self, python: str, repo: Path) -> str | None:
        key = (python, str(repo), tuple(sorted(self.config["env"].items())))
        if key not in _cuda_checks:
            _cuda_checks[key] = self._probe_cuda(python, repo)
        return _cuda_checks[key]

    def _probe_cuda(self, python: str, repo: Path) -> str | None:
        argv = [python, "-c", "import torch; print(torch.cuda.is_available())"]
        why = self.cuda_only_reason or f"device = {self.device_name()!r} was asked for"
        try:
            done = subprocess.run(
                argv, cwd=repo, env=self.subprocess_env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=CUDA_CHECK_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not run {python} to check CUDA: {exc}"
        if done.returncode != 0:
            return (f"{python} cannot import torch (exit status {done.returncode}); "
                    f"it needs the repository's environment:\n{output_tail(done.stderr)}")
        lines = done.stdout.strip().splitlines()
        if not lines or lines[-1].strip() != "True":
            return f"CUDA is not available to {python}; {why}"
        return None

    def device_name(self) -> str:
        return self.device

    def enhance_batch(
        self,
        audios: Sequence[np.ndarray],
        sr: int = SAMPLE_RATE,
        file_ids: Sequence[str] | None = None,
    ) -> list[np.ndarray | EnhancementError]:
        ids = batch_file_ids(audios, file_ids)
        if not getattr(self, "_checked", False):
            self.check()
        results: list[np.ndarray | EnhancementError | None] = [None] * len(audios)
        staged: dict[int, tuple[str, np.ndarray, int]] = {}
        for i, audio in enumerate(audios):
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1 or audio.size == 0 or not np.all(np.isfinite(audio)):
                results[i] = EnhancementError(ids[i], f"{self.name}: input is empty, not mono, or not finite")
            else:
                staged[i] = (staged_name(i, ids[i]), to_rate(audio, sr, SAMPLE_RATE), audio.size)
        if staged:
            with tempfile.TemporaryDirectory(prefix=f"serec_{self.name}_") as tmp:
                work = Path(tmp)
                in_dir = work / "noisy"
                in_dir.mkdir()
                for name, audio, _ in staged.values():
                    write_wav(in_dir / name, audio)
                failure = self._run_steps(work, in_dir)
                for i, (name, audio, length) in staged.items():
                    results[i] = self._collect(work, name, audio.size, sr, length, ids[i], failure)
        return [r for r in results if r is not None]

    def _collect(
        self, work: Path, name: str, staged_len: int, sr: int, length: int, fid: str, failure: str | None
    ) -> np.ndarray | EnhancementError:
        path = self.output_path(work, name)
        rel = path.relative_to(work)
        if not path.is_file():
            return EnhancementError(fid, failure or f"{self.name} wrote no output {rel} for this input")
        try:
            out = load_audio(path, SAMPLE_RATE, validate=False)
        except AudioError as exc:
            return EnhancementError(fid, f"{self.name} output {rel}: {exc.reason}")
        if not np.all(np.isfinite(out)):
            return EnhancementError(fid, f"{self.name} output {rel} contains NaN or Inf samples")
        if abs(out.size - staged_len) > LENGTH_TOLERANCE_S * SAMPLE_RATE:
            return EnhancementError(
                fid, f"{self.name} output {rel} has {out.size} samples at 16 kHz, the input {staged_len}"
            )
        return fit_length(to_rate(fit_length(out, staged_len), SAMPLE_RATE, sr), length)

    def command(self, step: Step) -> list[str]:
        python = self.python_executable() or self.config["python"]
        if step.seeded and self.config["seeded"]:
            return [python, str(LAUNCHER), str(self.seed), step.script, *step.args]
        return [python, step.script, *step.args]

    def _run_steps(self, work: Path, in_dir: Path) -> str | None:
        """Run the batch's commands in order; the reason of the first failure, or None."""
        for step in self.steps(work, in_dir):
            failure = self._run(self.command(step), work)
            if failure:
                return f"{self.name}: {step.script} {failure}"
        return None

    def _run(self, argv: list[str], work: Path) -> str | None:
        log_path = self.log_path or work / "output.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = self.config["timeout_s"] or None
        with open(log_path, "ab") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} cwd={self.repo}\n$ {shlex.join(argv)}\n".encode())
            log.flush()
            start = log.tell()
            try:
                done = subprocess.run(
                    argv, cwd=self.repo, env=self.subprocess_env(), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                )
                status = done.returncode
            except subprocess.TimeoutExpired:
                status = None
            except OSError as exc:
                return f"could not be started: {exc}"
        if status == 0:
            return None
        with open(log_path, "rb") as log:
            log.seek(start)
            tail = output_tail(log.read().decode("utf-8", errors="replace"))
        what = f"timed out after {timeout:g} s" if status is None else f"exited with status {status}"
        return f"{what}; last output:\n{tail}" if tail else what


@register_enhancer("SGMSE")
class SGMSE(ExternalEnhancer):
    """SGMSE / SGMSE+ (score-based diffusion in the complex STFT domain), sp-uhh/sgmse.

    `python enhancement.py --test_dir IN --enhanced_dir OUT --ckpt CKPT --corrector C
    --corrector_steps K --snr R --N N --device D [--sampler_type S] [--t_eps T]`; it
    reads IN/*.wav, writes OUT/<same name> at the model rate (48 kHz for ncsnpp_48k).
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set by default: Lightning checkpoints do not
    load with torch >= 2.6 otherwise. `device` defaults to the driver's --device; the
    pc sampler runs on CPU, the ode sampler needs CUDA.
    """

    scripts = ("enhancement.py",)
    default_env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    options: ClassVar[dict[str, Option]] = {
        "ckpt": Option(str, None, "Lightning checkpoint (.ckpt)", path="path"),
        "device": Option(str, None, "--device (default: the driver's --device)"),
        "sampler_type": Option(str, None, "--sampler_type (pc, ode); left out when unset", choices=("pc", "ode")),
        "corrector": Option(str, "ald", "--corrector", choices=("ald", "langevin", "none")),
        "corrector_steps": Option(int, 1, "--corrector_steps"),
        "snr": Option(float, 0.5, "--snr of the (annealed) Langevin corrector"),
        "N": Option(int, 30, "--N reverse steps"),
        "t_eps": Option(float, None, "--t_eps minimum process time; left out when unset"),
    }

    def device_name(self) -> str:
        return self.config["device"] or self.device

    def uses_cuda(self) -> bool:
        return self.device_name().startswith("cuda")

    def model_problem(self) -> str | None:
        return _file_problem(self.config["ckpt"], "ckpt", "checkpoint", self.name)

    def settings_problem(self) -> str | None:
        if self.config["sampler_type"] == "ode" and not self.uses_cuda():
            return "sampler_type = \"ode\" is CUDA-only in SGMSE; use the pc sampler on CPU or device = \"cuda\""
        return None

    def steps(self, work: Path, in_dir: Path) -> list[Step]:
        c = self.config
        args = [
            "--test_dir", str(in_dir), "--enhanced_dir", str(work / "enhanced"),
            "--ckpt", c["ckpt"], "--corrector", c["corrector"],
            "--corrector_steps", str(c["corrector_steps"]), "--snr", str(c["snr"]), "--N", str(c["N"]),
            "--device", self.device_name(),
        ]
        if c["sampler_type"] is not None:
            args += ["--sampler_type", c["sampler_type"]]
        if c["t_eps"] is not None:
            args += ["--t_eps", str(c["t_eps"])]
        return [Step("enhancement.py", args + list(c["extra_args"]))]

    def output_path(self, work: Path, name: str) -> Path:
        return work / "enhanced" / name


@register_enhancer("StoRM")
class StoRM(ExternalEnhancer):
    """StoRM (stochastic regeneration: predictive denoiser + diffusion), sp-uhh/storm.

    `python enhancement.py --test_dir IN --enhanced_dir OUT --ckpt CKPT --mode M
    --corrector C --corrector-steps K --snr R --N N`; reads top-level IN/*.wav only,
    asserts 16 kHz, writes OUT/<basename>. It needs its own old environment (Python
    3.8, torch 1.11), hence `python`.
    """

    scripts = ("enhancement.py",)
    cuda_only_reason = "StoRM is CUDA-only (no --device flag; its ops compile CUDA kernels at import)"
    options: ClassVar[dict[str, Option]] = {
        "ckpt": Option(str, None, "checkpoint (.ckpt)", path="path"),
        "mode": Option(str, "storm", "--mode", choices=("storm", "score-only", "denoiser-only")),
        "corrector": Option(str, "ald", "--corrector", choices=("ald", "langevin", "none")),
        "corrector_steps": Option(int, 1, "--corrector-steps"),
        "snr": Option(float, 0.5, "--snr of the (annealed) Langevin corrector"),
        "N": Option(int, 50, "--N reverse steps"),
    }

    def model_problem(self) -> str | None:
        return _file_problem(self.config["ckpt"], "ckpt", "checkpoint", self.name)

    def steps(self, work: Path, in_dir: Path) -> list[Step]:
        c = self.config
        args = [
            "--test_dir", str(in_dir), "--enhanced_dir", str(work / "enhanced"),
            "--ckpt", c["ckpt"], "--mode", c["mode"], "--corrector", c["corrector"],
            "--corrector-steps", str(c["corrector_steps"]), "--snr", str(c["snr"]), "--N", str(c["N"]),
        ]
        return [Step("enhancement.py", args + list(c["extra_args"]))]

    def output_path(self, work: Path, name: str) -> Path:
        return work / "enhanced" / name


@register_enhancer("CDiffuSE")
class CDiffuSE(ExternalEnhancer):
    """CDiffuSE (conditional diffusion on the waveform), neillu23/CDiffuSE.

    Two commands per batch, run from the repo root:
    `python src/cdiffuse/preprocess.py IN SPEC --se --test --voicebank` (writes
    SPEC/<name>.wav.spec.npy), then `python src/cdiffuse/inference.py MODEL_DIR SPEC IN
    -o OUT --se --voicebank --fast|--full`, which writes OUT/<basename of SPEC>/<name>.wav.
    `model_dir` is a folder with weights.pt or the .pt file itself.
    """

    scripts = ("src/cdiffuse/preprocess.py", "src/cdiffuse/inference.py")
    cuda_only_reason = "CDiffuSE is CUDA-only (its inference puts the model and sampler on cuda)"
    options: ClassVar[dict[str, Option]] = {
        "model_dir": Option(str, None, "folder with weights.pt, or the weights file", path="path"),
        "fast": Option(bool, True, "--fast (6-step schedule) or --full (50 steps)"),
    }

    def model_problem(self) -> str | None:
        model = self.config["model_dir"]
        if model is None:
            return f"no model configured: set model_dir in the [{self.name}] table of --models_config"
        path = Path(model)
        if path.is_dir() and not (path / "weights.pt").is_file():
            return f"model_dir {path} has no weights.pt"
        if not path.exists():
            return f"model_dir {path} does not exist"
        return None

    def steps(self, work: Path, in_dir: Path) -> list[Step]:
        spec_dir = work / "spec"
        spec_dir.mkdir(exist_ok=True)  # preprocess.py saves into it without creating it
        return [
            # Preprocessing draws no random numbers and uses a process pool: run it plainly.
            Step("src/cdiffuse/preprocess.py", [str(in_dir), str(spec_dir), "--se", "--test", "--voicebank"],
                 seeded=False),
            Step(
                "src/cdiffuse/inference.py",
                [self.config["model_dir"], str(spec_dir), str(in_dir), "-o", str(work / "enhanced"),
                 "--se", "--voicebank", "--fast" if self.config["fast"] else "--full",
                 *self.config["extra_args"]],
            ),
        ]

    def output_path(self, work: Path, name: str) -> Path:
        return work / "enhanced" / "spec" / name


def _file_problem(value: str | None, key: str, what: str, name: str) -> str | None:
    if value is None:
        return f"no {what} configured: set {key} in the [{name}] table of --models_config"
    if not Path(value).is_file():
        return f"{what} {value} does not exist"
    return None

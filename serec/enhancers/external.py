"""Adapters that run upstream SE repositories (SGMSE, StoRM, CDiffuSE) as subprocesses.

Each batch is staged as 16 kHz 16-bit WAVs with flat, safe names in a temp folder, the
upstream command lines (docs/upstream.md sections 2-4) run once per batch with the
repository as working directory and the configured Python, and the outputs are read
back, validated (present, finite, input length within 20 ms) and resampled to 16 kHz.
A missing repo, script, checkpoint, Python or CUDA, and a Python environment in which
the scripts cannot start (each is run with `--help` once: a missing import shows there),
are reported by `check()` before any work starts. Each subprocess gets `num_threads`
OpenMP/MKL threads (default: every core this process may use; external batches run
while no worker process of the run does), and its outputs are counted as they appear
so a progress bar moves within a batch.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from serec.audio import SAMPLE_RATE, AudioError, load_audio, write_wav
from serec.enhancers.base import (
    EnhancementError,
    Enhancer,
    EnhancerUnavailable,
    ModelsConfigError,
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
PROBE_TIMEOUT_S = 300
# A checkpoint's data.pkl holds the structure, not the weights: a few MB at most.
MAX_CHECKPOINT_PICKLE_BYTES = 64 * 2**20
# How often a running batch's output folder is looked at for the progress bar.
PROGRESS_POLL_S = 1.0

# (what, python, repo, env) -> None if it works, else the reason; probed once per process.
_probes: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], str | None] = {}


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


def failing_import(output: str) -> str | None:
    """The last `ModuleNotFoundError: ...` or `ImportError: ...` line of a process's output."""
    found = re.findall(r"^(?:ModuleNotFoundError|ImportError): .*$", output, flags=re.MULTILINE)
    return found[-1].strip() if found else None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
        "num_threads": Option(int, 0, "OMP_NUM_THREADS and MKL_NUM_THREADS of the subprocess "
                              "(0: every core this process may use)", affects_output=False),
        "num_gpus": Option(float, 0.0, "GPUs a batch asks the cluster for with --backend ray "
                           "(1 for a diffusion model on GPU)", affects_output=False),
        "num_cpus": Option(float, 1.0, "CPUs a batch asks the cluster for with --backend ray",
                           affects_output=False),
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
        if self.config["num_threads"] < 0:
            raise ModelsConfigError(f"config: [{name}] num_threads must be >= 0, got {self.config['num_threads']}")

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
        # The worker setup caps this process at one thread (OMP_NUM_THREADS=1), which the
        # subprocess would inherit; `env` can still override the thread counts.
        threads = str(self.config["num_threads"] or available_cores())
        return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                **self.default_env, **self.config["env"]}

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
        # CUDA first: without it a CUDA-only repository's scripts may not even import, and
        # "CUDA is not available" is the message that helps then.
        probes = [("cuda", self._probe_cuda)] if self.uses_cuda() else []
        probes += [(script, self._probe_script) for script in self.scripts]
        for what, probe in probes:
            reason = self._probed(what, python, repo, probe)
            if reason:
                raise EnhancerUnavailable(self.name, reason)
        self._checked = True

    def _probed(self, what: str, python: str, repo: Path, probe: Callable[[str, str, Path], str | None]) -> str | None:
        key = (what, python, str(repo), tuple(sorted(self.config["env"].items())))
        if key not in _probes:
            _probes[key] = probe(what, python, repo)
        return _probes[key]

    def _probe_script(self, script: str, python: str, repo: Path) -> str | None:
        """Run `python SCRIPT --help` as a batch would run it: its imports must load."""
        try:
            done = subprocess.run(
                [python, script, "--help"], cwd=repo, env=self.subprocess_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=PROBE_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not run {python} {script} --help to check its environment: {exc}"
        if done.returncode == 0:
            return None
        missing = failing_import(done.stdout)
        what = f"the import that fails: {missing}" if missing else f"last output:\n{output_tail(done.stdout)}"
        return (f"{script} does not start with {python} (`{script} --help` exited with status "
                f"{done.returncode}); {what}\nInstall the repository's requirements into that environment, "
                "or set python = \"/path/to/env/bin/python\" of one that has them")

    def _probe_cuda(self, _: str, python: str, repo: Path) -> str | None:
        argv = [python, "-c", "import torch; print(torch.cuda.is_available())"]
        why = self.cuda_only_reason or f"device = {self.device_name()!r} was asked for"
        try:
            done = subprocess.run(
                argv, cwd=repo, env=self.subprocess_env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
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
                outputs = [self.output_path(work, name) for name, _, _ in staged.values()]
                with tqdm(total=len(outputs), desc=f"{self.name} batch", unit="file", leave=False,
                          disable=None) as bar:
                    failure = self._run_steps(work, in_dir, lambda: bar.update(
                        sum(path.is_file() for path in outputs) - bar.n))
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

    def _run_steps(self, work: Path, in_dir: Path, on_poll: Callable[[], None]) -> str | None:
        """Run the batch's commands in order; the reason of the first failure, or None."""
        for step in self.steps(work, in_dir):
            failure = self._run(self.command(step), work, on_poll)
            if failure:
                return f"{self.name}: {step.script} {failure}"
        return None

    def _run(self, argv: list[str], work: Path, on_poll: Callable[[], None]) -> str | None:
        """Run one command, calling `on_poll` every PROGRESS_POLL_S while it runs."""
        log_path = self.log_path or work / "output.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = self.config["timeout_s"] or None
        with open(log_path, "ab") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} cwd={self.repo}\n$ {shlex.join(argv)}\n".encode())
            log.flush()
            start = log.tell()
            try:
                process = subprocess.Popen(
                    argv, cwd=self.repo, env=self.subprocess_env(), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                return f"could not be started: {exc}"
            status = _follow(process, timeout, on_poll)
        if status == 0:
            return None
        with open(log_path, "rb") as log:
            log.seek(start)
            tail = output_tail(log.read().decode("utf-8", errors="replace"))
        what = f"timed out after {timeout:g} s" if status is None else f"exited with status {status}"
        return f"{what}; last output:\n{tail}" if tail else what


def _follow(process: subprocess.Popen, timeout: float | None, on_poll: Callable[[], None]) -> int | None:
    """Wait for `process`, polling; its exit status, or None when it ran past `timeout` (killed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            wait = PROGRESS_POLL_S if deadline is None else min(PROGRESS_POLL_S, deadline - time.monotonic())
            try:
                status = process.wait(max(wait, 0.0))
            except subprocess.TimeoutExpired:
                on_poll()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            on_poll()
            return status
    finally:
        # Timed out, Ctrl-C or any error here: the batch's process must not outlive it.
        if process.poll() is None:
            process.kill()
            process.wait()


@register_enhancer("SGMSE")
class SGMSE(ExternalEnhancer):
    """SGMSE / SGMSE+ (score-based diffusion in the complex STFT domain), sp-uhh/sgmse.

    `python enhancement.py --test_dir IN --enhanced_dir OUT --ckpt CKPT --corrector C
    --corrector_steps K --snr R --N N --device D [--sampler_type S] [--t_eps T]`; it
    reads IN/*.wav, writes OUT/<same name> at the model rate (48 kHz for ncsnpp_48k).
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set by default: Lightning checkpoints do not
    load with torch >= 2.6 otherwise. `device` defaults to the driver's --device; the
    pc sampler runs on CPU, the ode sampler needs CUDA, and so do Schroedinger-bridge
    checkpoints (`sde = "sbve"` in their hyper_parameters, read by `check()` without
    loading the checkpoint; one whose hyper_parameters cannot be read is not refused).
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
        problem = _file_problem(self.config["ckpt"], "ckpt", "checkpoint", self.name)
        if problem or self.uses_cuda():
            return problem
        sde = (checkpoint_hyper_parameters(self.config["ckpt"]) or {}).get("sde")
        if sde == "sbve":
            return (f"checkpoint {self.config['ckpt']} is a Schroedinger-bridge model (hyper_parameters "
                    "sde = 'sbve'), which SGMSE runs on CUDA only whatever the sampler; "
                    "use device = \"cuda\" or a score-based (ouve) checkpoint")
        return None

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


class _Inert(dict):
    """Stands in for every class a checkpoint's pickle names: built, filled, never run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """Reads a pickle's plain data without importing or calling anything it names."""

    def find_class(self, module: str, name: str) -> type:
        return _Inert

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages: not read


def checkpoint_hyper_parameters(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`hyper_parameters` of a Lightning checkpoint (a torch zip archive), or None if unreadable.

    Only the archive's small `data.pkl` is read, with every class replaced by an inert
    stand-in, so no code in the checkpoint runs and no weights are loaded. Plain values
    (strings, numbers) come back as they are, which is what the SDE name is.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            info = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
            if info is None or info.file_size > MAX_CHECKPOINT_PICKLE_BYTES:
                return None
            data = archive.read(info)
        loaded = _InertUnpickler(io.BytesIO(data)).load()
    except Exception:  # not a zip, a foreign or damaged pickle: nothing can be told from it
        return None
    hyper = loaded.get("hyper_parameters") if isinstance(loaded, dict) else None
    return dict(hyper) if isinstance(hyper, dict) else None


def _file_problem(value: str | None, key: str, what: str, name: str) -> str | None:
    if value is None:
        return f"no {what} configured: set {key} in the [{name}] table of --models_config"
    if not Path(value).is_file():
        return f"{what} {value} does not exist"
    return None

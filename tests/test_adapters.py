"""Contract tests of the SGMSE / StoRM / CDiffuSE adapters against stand-in upstream scripts.

The stand-ins are written here, at test time, and follow each upstream command line
exactly (docs/upstream.md sections 2-4): the same argparse flags (required ones
required), the same input globbing, output naming, sample-rate handling and extra
folder level, the same relative imports from the script's folder. Instead of a model
they apply a gain read from a JSON "checkpoint", so a wrong contract breaks a test.
A stand-in `torch` (reports CUDA, records the seed) is put on PYTHONPATH through the
adapters' `env` option.
"""

from __future__ import annotations

import json
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from serec.enhancers import (
    EnhancementError,
    EnhancerUnavailable,
    create_enhancer,
    external,
    load_models_config,
)
from serec.enhancers.external import LAUNCHER, available_cores, checkpoint_hyper_parameters
from serec.synth import speech_like

FAKE_TORCH = '''
"""Stand-in torch: CUDA is 'available' and manual_seed is recorded."""
_seed = None


class Tensor:  # looked up by scipy's array-API helpers when torch is imported
    pass


def manual_seed(seed):
    global _seed
    _seed = int(seed)


def initial_seed():
    return _seed


class cuda:
    @staticmethod
    def is_available():
        return True
'''

BROKEN_TORCH = 'raise ImportError("libtorch_cuda.so: cannot open shared object file")\n'

SGMSE_MODEL = '''
import json
import os


def load_checkpoint(path):
    # Like Lightning under torch >= 2.6 without the override.
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") != "1":
        raise RuntimeError("Weights only load failed: set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1")
    with open(path) as fh:
        return json.load(fh)
'''

# Behaviour switches read from the JSON checkpoint, shared by the SGMSE and StoRM stand-ins.
MODEL_BEHAVIOUR = '''
def model_output(model, y, filename, index):
    if index == model.get("fail_at"):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if model.get("sleep"):
        time.sleep(model["sleep"])
    if model.get("skip") and model["skip"] in filename:
        return None
    x_hat = model["gain"] * y + model.get("dither", 0.0) * np.random.randn(y.size)
    if model.get("truncate") and model["truncate"] in filename:
        x_hat = x_hat[: x_hat.size // 2]
    return x_hat
'''

SGMSE_ENHANCEMENT = '''
import glob
import os
import time
from argparse import ArgumentParser
from os import makedirs
from os.path import dirname, join

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from sgmse.model import load_checkpoint
''' + MODEL_BEHAVIOUR + '''

if __name__ == '__main__':
    parser = ArgumentParser()
    parser.add_argument("--test_dir", type=str, required=True)
    parser.add_argument("--enhanced_dir", type=str, required=True)
    parser.add_argument("--ckpt", type=str)
    parser.add_argument("--sampler_type", type=str, default="pc")
    parser.add_argument("--corrector", type=str, choices=("ald", "langevin", "none"), default="ald")
    parser.add_argument("--corrector_steps", type=int, default=1)
    parser.add_argument("--snr", type=float, default=0.5)
    parser.add_argument("--N", type=int, default=30)
    parser.add_argument("--device", type=str, default="cuda")
    parser.add_argument("--t_eps", type=float, default=0.03)
    args = parser.parse_args()

    model = load_checkpoint(args.ckpt)
    print("seed", torch.initial_seed(), "device", args.device, "N", args.N)
    print("threads", os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"))

    noisy_files = []
    noisy_files += sorted(glob.glob(join(args.test_dir, '*.wav')))
    noisy_files += sorted(glob.glob(join(args.test_dir, '**', '*.wav')))
    noisy_files += sorted(glob.glob(join(args.test_dir, '*.flac')))
    noisy_files += sorted(glob.glob(join(args.test_dir, '**', '*.flac')))
    target_sr = 48000 if model["backbone"] == "ncsnpp_48k" else 16000

    for index, noisy_file in enumerate(noisy_files):
        filename = noisy_file.replace(args.test_dir, "")
        filename = filename[1:] if filename.startswith("/") else filename
        y, sr = sf.read(noisy_file, dtype="float32")
        if sr != target_sr:
            y = resample_poly(y, target_sr, sr)
        x_hat = model_output(model, y, filename, index)
        if x_hat is None:
            continue
        makedirs(dirname(join(args.enhanced_dir, filename)), exist_ok=True)
        sf.write(join(args.enhanced_dir, filename), x_hat, target_sr)
'''

STORM_ENHANCEMENT = '''
import glob
import json
import os
import time
from argparse import ArgumentParser

import numpy as np
import soundfile as sf
import torch
''' + MODEL_BEHAVIOUR + '''

base_parser = ArgumentParser(add_help=False)
parser = ArgumentParser()
for parser_ in (base_parser, parser):
    parser_.add_argument("--test_dir", type=str, required=True)
    parser_.add_argument("--enhanced_dir", type=str, required=True)
    parser_.add_argument("--ckpt", type=str, required=True)
    parser_.add_argument("--mode", required=True, choices=["score-only", "denoiser-only", "storm"])
    parser_.add_argument("--corrector", type=str, choices=("ald", "langevin", "none"), default="ald")
    parser_.add_argument("--corrector-steps", type=int, default=1)
    parser_.add_argument("--snr", type=float, default=0.5)
    parser_.add_argument("--N", type=int, default=50)
args = parser.parse_args()

os.makedirs(args.enhanced_dir, exist_ok=True)
with open(args.ckpt) as fh:
    model = json.load(fh)
assert torch.cuda.is_available(), "model.cuda() needs CUDA"
print("mode", args.mode, "corrector_steps", args.corrector_steps)
model_sr = 16000

noisy_files = sorted(glob.glob(os.path.join(args.test_dir, "*.wav")))
for index, f in enumerate(noisy_files):
    y, sample_sr = sf.read(f, dtype="float32")
    assert sample_sr == model_sr, "You need to make sure sample_sr matches model_sr --> resample to 16kHz"
    x_hat = model_output(model, y, os.path.basename(f), index)
    if x_hat is not None:
        sf.write(f"{args.enhanced_dir}/{os.path.basename(f)}", x_hat.astype(np.float32), model_sr, subtype="FLOAT")
'''

CDIFFUSE_PARAMS = 'params = dict(sample_rate=16000, n_fft=1024, hop_samples=256)\n'

CDIFFUSE_PREPROCESS = '''
from argparse import ArgumentParser
from concurrent.futures import ProcessPoolExecutor
from glob import glob
from itertools import repeat

import numpy as np
import soundfile as sf

from params import params


def spec_transform(filename, indir, outdir):
    y, sr = sf.read(filename, dtype="float32")
    if sr != 16000:
        raise ValueError("Sampling rate is expected to be 16kHz!")
    frames = 1 + y.size // params["hop_samples"]
    spec = np.full((params["n_fft"] // 2 + 1, frames), np.log1p(np.max(np.abs(y))), dtype=np.float32)
    np.save(f"{filename.replace(indir, outdir)}.spec.npy", spec)


def main(args):
    filenames = glob(f"{args.dir}/*.wav", recursive=True)
    with ProcessPoolExecutor(max_workers=2) as executor:
        list(executor.map(spec_transform, filenames, repeat(args.dir), repeat(args.outdir)))


if __name__ == "__main__":
    parser = ArgumentParser(description="prepares a dataset to train DiffuSE")
    parser.add_argument("dir")
    parser.add_argument("outdir")
    parser.add_argument("--se", dest="se", action="store_true")
    parser.add_argument("--se_pre", dest="se", action="store_false")
    parser.add_argument("--train", dest="test", action="store_false")
    parser.add_argument("--test", dest="test", action="store_true")
    parser.add_argument("--voicebank", dest="voicebank", action="store_true")
    parser.set_defaults(se=True)
    parser.set_defaults(test=False)
    parser.set_defaults(voicebank=True)
    main(parser.parse_args())
'''

CDIFFUSE_INFERENCE = '''
import json
import os
from argparse import ArgumentParser
from glob import glob

import numpy as np
import soundfile as sf
import torch

from params import params


def load_model(model_dir):
    path = f"{model_dir}/weights.pt" if os.path.exists(f"{model_dir}/weights.pt") else model_dir
    with open(path) as fh:
        return json.load(fh)


def main(args):
    specnames = []
    for path in args.spectrogram_path:
        specnames += glob(f"{path}/*.wav.spec.npy", recursive=True)
    model = load_model(args.model_dir)
    assert torch.cuda.is_available(), "the model is put on cuda"
    print("schedule", "fast" if args.fast else "full")
    output_path = os.path.join(args.output, specnames[0].split("/")[-2])
    if not os.path.exists(output_path):
        os.makedirs(output_path)
    for spec in specnames:
        spectrogram = np.load(spec)
        wav = os.path.join(args.wav_path, spec.split("/")[-1].replace(".spec.npy", ""))
        noisy_signal, _ = sf.read(wav, dtype="float32")
        wlen = noisy_signal.shape[0]
        audio = np.zeros(params["hop_samples"] * spectrogram.shape[-1], dtype=np.float32)
        audio[:wlen] = noisy_signal
        audio = np.clip(model["gain"] * audio, -1.0, 1.0)[:wlen]
        output_name = os.path.join(output_path, spec.split("/")[-1].replace(".spec.npy", ""))
        sf.write(output_name, audio, params["sample_rate"], subtype="FLOAT")


if __name__ == "__main__":
    parser = ArgumentParser(description="runs inference on a spectrogram file")
    parser.add_argument("model_dir")
    parser.add_argument("spectrogram_path", nargs="+")
    parser.add_argument("wav_path")
    parser.add_argument("--output", "-o", default="output/")
    parser.add_argument("--fast", dest="fast", action="store_true")
    parser.add_argument("--full", dest="fast", action="store_false")
    parser.add_argument("--se", dest="se", action="store_true")
    parser.add_argument("--se_pre", dest="se", action="store_false")
    parser.add_argument("--voicebank", dest="voicebank", action="store_true")
    parser.set_defaults(se=True)
    parser.set_defaults(fast=True)
    parser.set_defaults(voicebank=False)
    main(parser.parse_args())
'''

FILE_IDS = ["spk1/utt 1.wav", "spk2/utt 1.wav", "top.flac"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def torch_dirs(tmp_path: Path) -> dict[str, Path]:
    write(tmp_path / "faketorch" / "torch" / "__init__.py", FAKE_TORCH)
    write(tmp_path / "brokentorch" / "torch" / "__init__.py", BROKEN_TORCH)
    return {"fake": tmp_path / "faketorch", "broken": tmp_path / "brokentorch"}


@pytest.fixture
def sgmse_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "sgmse"
    write(repo / "enhancement.py", SGMSE_ENHANCEMENT)
    write(repo / "sgmse" / "__init__.py", "")
    write(repo / "sgmse" / "model.py", SGMSE_MODEL)
    return repo


@pytest.fixture
def storm_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "storm"
    write(repo / "enhancement.py", STORM_ENHANCEMENT)
    return repo


@pytest.fixture
def cdiffuse_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "CDiffuSE"
    write(repo / "src" / "cdiffuse" / "params.py", CDIFFUSE_PARAMS)
    write(repo / "src" / "cdiffuse" / "preprocess.py", CDIFFUSE_PREPROCESS)
    write(repo / "src" / "cdiffuse" / "inference.py", CDIFFUSE_INFERENCE)
    return repo


def checkpoint(tmp_path: Path, name: str = "model.ckpt", **model: object) -> Path:
    return write(tmp_path / "ckpts" / name, json.dumps({"backbone": "ncsnpp", "gain": 0.5, **model}))


def adapter(tmp_path: Path, name: str, table: str, seed: int = 0):
    """Write a models config holding one table, load it like the driver does, build the model."""
    config = write(tmp_path / f"{name}.toml", f"[{name}]\n{table}")
    models = load_models_config(config)
    return create_enhancer(name, models[name], device="cpu", seed=seed)


def common(repo: Path, torch_dir: Path) -> str:
    return (f'repo = "{repo}"\npython = "{sys.executable}"\n'
            f'env = {{ PYTHONPATH = "{torch_dir}" }}\n')


def inputs(n: int = 3, seconds: float = 0.5, sr: int = 16_000) -> list[np.ndarray]:
    rng = np.random.default_rng(9)
    return [speech_like(rng, seconds + 0.1 * i, sr=sr) for i in range(n)]


def logged_commands(log: Path) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in log.read_text().splitlines() if line.startswith("$ ")]


def test_sgmse_command_line_staging_and_outputs(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path)
    log = tmp_path / "logs" / "sgmse.log"
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"])
                    + f'ckpt = "{ckpt}"\nN = 12\nlog_file = "{log}"\n', seed=7)
    sgmse.check()
    audios = inputs()
    # Usable in a worker process: pickled by name + config, re-checked lazily there.
    results = pickle.loads(pickle.dumps(sgmse)).enhance_batch(audios, file_ids=FILE_IDS)
    for audio, out in zip(audios, results, strict=True):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == audio.shape
        np.testing.assert_allclose(out, 0.5 * audio, atol=2e-4)
    (argv,) = logged_commands(log)
    assert argv[:4] == [sys.executable, str(LAUNCHER), "7", "enhancement.py"]
    flags = argv[4:]
    assert flags[0::2] == ["--test_dir", "--enhanced_dir", "--ckpt", "--corrector", "--corrector_steps",
                           "--snr", "--N", "--device"]
    assert flags[5:] == [str(ckpt), "--corrector", "ald", "--corrector_steps", "1", "--snr", "0.5",
                         "--N", "12", "--device", "cpu"]
    assert "seed 7 device cpu N 12" in log.read_text()


def test_sgmse_48k_model_is_resampled_back(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path, backbone="ncsnpp_48k", gain=0.8)
    sgmse = adapter(tmp_path, "SGMSE_48k", 'type = "SGMSE"\n' + common(sgmse_repo, torch_dirs["fake"])
                    + f'ckpt = "{ckpt}"\n')
    audios = inputs(2)
    for audio, out in zip(audios, sgmse.enhance_batch(audios, file_ids=FILE_IDS[:2]), strict=True):
        assert out.shape == audio.shape
        inner = slice(200, -200)  # resampling filters ring at the edges
        np.testing.assert_allclose(out[inner], 0.8 * audio[inner], atol=3e-3)


def test_sgmse_other_input_rate_and_sampler_flags(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path)
    log = tmp_path / "sgmse.log"
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"])
                    + f'ckpt = "{ckpt}"\nsampler_type = "pc"\nt_eps = 0.05\nlog_file = "{log}"\n'
                    'extra_args = ["--corrector", "none"]\n')
    audio = inputs(1, sr=22_050)[0]
    out = sgmse.enhance_one(audio, sr=22_050, file_id="a.wav")
    assert out.shape == audio.shape
    (argv,) = logged_commands(log)
    assert argv[-6:] == ["--sampler_type", "pc", "--t_eps", "0.05", "--corrector", "none"]


def test_seed_reaches_the_sampler(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path, dither=0.01)
    table = common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{ckpt}"\n'
    audios = inputs(1)
    first = adapter(tmp_path, "SGMSE", table, seed=1).enhance_batch(audios)[0]
    again = adapter(tmp_path, "SGMSE", table, seed=1).enhance_batch(audios)[0]
    other = adapter(tmp_path, "SGMSE", table, seed=2).enhance_batch(audios)[0]
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - other)) > 1e-3


def test_failing_subprocess_reports_status_and_stderr_tail(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path, fail_at=1)
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{ckpt}"\n')
    audios = inputs()
    results = sgmse.enhance_batch(audios, file_ids=FILE_IDS)
    # The file written before the crash is kept; the others carry the exit status and traceback.
    np.testing.assert_allclose(results[0], 0.5 * audios[0], atol=2e-4)
    for fid, result in zip(FILE_IDS[1:], results[1:], strict=True):
        assert isinstance(result, EnhancementError) and result.file_id == fid
        assert "enhancement.py exited with status 1" in result.reason
        assert "RuntimeError: CUDA out of memory" in result.reason


def test_missing_short_and_bad_outputs_are_per_file(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    # Staged names start with the batch index: 00001_ is the second input, 00002_ the third.
    ckpt = checkpoint(tmp_path, skip="00001_", truncate="00002_")
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{ckpt}"\n')
    audios = inputs(4)
    audios[3] = np.full_like(audios[3], np.nan)
    ids = ["a.wav", "b.wav", "c.wav", "d.wav"]
    results = sgmse.enhance_batch(audios, file_ids=ids)
    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], EnhancementError) and "wrote no output enhanced/00001_b.wav" in results[1].reason
    assert isinstance(results[2], EnhancementError) and "samples at 16 kHz, the input" in results[2].reason
    assert isinstance(results[3], EnhancementError) and "not finite" in results[3].reason
    assert [r.file_id for r in results[1:]] == ids[1:]


def test_timeout_kills_the_batch(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path, sleep=60)
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"])
                    + f'ckpt = "{ckpt}"\ntimeout_s = 1\n')
    (result,) = sgmse.enhance_batch(inputs(1))
    assert isinstance(result, EnhancementError) and "timed out after 1 s" in result.reason


def test_storm_contract(tmp_path: Path, storm_repo: Path, torch_dirs) -> None:
    ckpt = checkpoint(tmp_path, gain=0.8)
    log = tmp_path / "storm.log"
    storm = adapter(tmp_path, "StoRM", common(storm_repo, torch_dirs["fake"])
                    + f'ckpt = "{ckpt}"\nmode = "denoiser-only"\ncorrector_steps = 2\nlog_file = "{log}"\n')
    storm.check()
    # 22.05 kHz inputs: the stand-in asserts 16 kHz, so the adapter must resample.
    audios = inputs(sr=22_050)
    results = storm.enhance_batch(audios, sr=22_050, file_ids=FILE_IDS)
    for audio, out in zip(audios, results, strict=True):
        assert isinstance(out, np.ndarray) and out.shape == audio.shape
        inner = slice(200, -200)
        np.testing.assert_allclose(out[inner], 0.8 * audio[inner], atol=3e-3)
    (argv,) = logged_commands(log)
    assert argv[3] == "enhancement.py"
    assert argv[8:] == ["--ckpt", str(ckpt), "--mode", "denoiser-only", "--corrector", "ald",
                        "--corrector-steps", "2", "--snr", "0.5", "--N", "50"]
    assert "mode denoiser-only corrector_steps 2" in log.read_text()


def test_cdiffuse_contract(tmp_path: Path, cdiffuse_repo: Path, torch_dirs) -> None:
    weights = write(tmp_path / "cdiffuse_model" / "weights.pt", json.dumps({"gain": 0.5}))
    log = tmp_path / "cdiffuse.log"
    table = common(cdiffuse_repo, torch_dirs["fake"]) + f'log_file = "{log}"\n'
    cdiffuse = adapter(tmp_path, "CDiffuSE", table + f'model_dir = "{weights.parent}"\n')
    cdiffuse.check()
    audios = inputs()
    for audio, out in zip(audios, cdiffuse.enhance_batch(audios, file_ids=FILE_IDS), strict=True):
        assert isinstance(out, np.ndarray) and out.shape == audio.shape
        np.testing.assert_allclose(out, 0.5 * audio, atol=1e-4)
    preprocess, inference = logged_commands(log)
    assert preprocess[1] == "src/cdiffuse/preprocess.py"  # deterministic: not run through the launcher
    assert preprocess[4:] == ["--se", "--test", "--voicebank"]
    assert inference[3] == "src/cdiffuse/inference.py"
    assert inference[4] == str(weights.parent) and inference[7] == "-o"
    assert inference[9:] == ["--se", "--voicebank", "--fast"]
    assert Path(inference[5]).name == "spec" and inference[6] == preprocess[2]

    # model_dir may also name the weights file itself; fast = false runs the full schedule.
    full = adapter(tmp_path, "CDiffuSE", table + f'model_dir = "{weights}"\nfast = false\n')
    assert isinstance(full.enhance_batch(audios[:1])[0], np.ndarray)
    assert logged_commands(log)[-1][-1] == "--full"
    assert "schedule full" in log.read_text()


def test_check_reports_missing_parts_before_any_work(
    tmp_path: Path, sgmse_repo: Path, cdiffuse_repo: Path, torch_dirs
) -> None:
    ckpt = checkpoint(tmp_path)
    fake = torch_dirs["fake"]
    cases = [
        (create_enhancer("SGMSE"), "no repository configured"),
        (adapter(tmp_path, "SGMSE", common(tmp_path / "nowhere", fake) + f'ckpt = "{ckpt}"\n'),
         "nowhere does not exist"),
        (adapter(tmp_path, "SGMSE", common(tmp_path, fake) + f'ckpt = "{ckpt}"\n'),
         "enhancement.py not found"),
        (adapter(tmp_path, "SGMSE", common(sgmse_repo, fake)), "no checkpoint configured: set ckpt"),
        (adapter(tmp_path, "SGMSE", common(sgmse_repo, fake) + f'ckpt = "{tmp_path / "x.ckpt"}"\n'),
         "x.ckpt does not exist"),
        (adapter(tmp_path, "SGMSE", f'repo = "{sgmse_repo}"\npython = "{tmp_path / "env/bin/python"}"\n'
                 f'ckpt = "{ckpt}"\n'), "env/bin/python' not found"),
        (adapter(tmp_path, "SGMSE", f'repo = "{sgmse_repo}"\npython = "no-such-python-3.8"\nckpt = "{ckpt}"\n'),
         "no-such-python-3.8' not found"),
        (adapter(tmp_path, "SGMSE", common(sgmse_repo, fake) + f'ckpt = "{ckpt}"\nsampler_type = "ode"\n'),
         "ode\" is CUDA-only"),
        (adapter(tmp_path, "CDiffuSE", common(cdiffuse_repo, fake) + f'model_dir = "{tmp_path}"\n'),
         "has no weights.pt"),
    ]
    for enhancer, message in cases:
        with pytest.raises(EnhancerUnavailable, match=message.replace(".", r"\.")):
            enhancer.check()
    # enhance_batch checks first too: nothing is staged or run for an unusable model.
    with pytest.raises(EnhancerUnavailable, match="no repository configured"):
        create_enhancer("StoRM").enhance_batch(inputs(1))


def test_cuda_only_models_say_so_without_cuda(
    tmp_path: Path, storm_repo: Path, cdiffuse_repo: Path, sgmse_repo: Path, torch_dirs
) -> None:
    ckpt = checkpoint(tmp_path)
    # This machine's real torch has no CUDA.
    storm = adapter(tmp_path, "StoRM", f'repo = "{storm_repo}"\npython = "{sys.executable}"\nckpt = "{ckpt}"\n')
    with pytest.raises(EnhancerUnavailable, match="CUDA is not available .*StoRM is CUDA-only"):
        storm.check()
    weights = write(tmp_path / "weights.pt", "{}")
    cdiffuse = adapter(tmp_path, "CDiffuSE", common(cdiffuse_repo, torch_dirs["broken"])
                       + f'model_dir = "{weights}"\n')
    with pytest.raises(EnhancerUnavailable, match="cannot import torch(.|\n)*libtorch_cuda.so"):
        cdiffuse.check()
    # On CPU the scripts themselves are probed: the failing import is named.
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["broken"]) + f'ckpt = "{ckpt}"\n')
    with pytest.raises(EnhancerUnavailable, match="enhancement.py does not start(.|\n)*"
                       "the import that fails: ImportError: libtorch_cuda.so"):
        sgmse.check()


def test_broken_environment_is_reported_before_any_work_on_cpu(
    tmp_path: Path, sgmse_repo: Path, torch_dirs
) -> None:
    # SGMSE's own environment without torchaudio: found at check(), not as every batch failing.
    script = sgmse_repo / "enhancement.py"
    script.write_text("import torchaudio\n" + script.read_text())
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{checkpoint(tmp_path)}"\n')
    with pytest.raises(EnhancerUnavailable, match="enhancement.py does not start with .*status 1.*"
                       "the import that fails: ModuleNotFoundError: No module named 'torchaudio'"):
        sgmse.check()


class AttributeDict(dict):
    """Stands for Lightning's hparams type: pickled by reference, never imported back."""


def lightning_checkpoint(path: Path, sde: str) -> Path:
    import collections

    import torch

    torch.save({"hyper_parameters": AttributeDict(sde=sde, backbone="ncsnpp", N=30),
                "state_dict": collections.OrderedDict(weight=torch.zeros(4)), "epoch": 1}, path)
    return path


def test_schroedinger_bridge_checkpoints_need_cuda(tmp_path: Path, sgmse_repo: Path, torch_dirs) -> None:
    sbve = lightning_checkpoint(tmp_path / "sbve.ckpt", "sbve")
    ouve = lightning_checkpoint(tmp_path / "ouve.ckpt", "ouve")
    assert checkpoint_hyper_parameters(sbve) == {"sde": "sbve", "backbone": "ncsnpp", "N": 30}
    assert checkpoint_hyper_parameters(checkpoint(tmp_path)) is None  # not a torch archive: no verdict
    table = common(sgmse_repo, torch_dirs["fake"])
    with pytest.raises(EnhancerUnavailable, match="Schroedinger-bridge model .*sde = 'sbve'.*CUDA only"):
        adapter(tmp_path, "SGMSE", table + f'ckpt = "{sbve}"\n').check()
    adapter(tmp_path, "SGMSE", table + f'ckpt = "{ouve}"\n').check()


def test_num_threads_reach_the_subprocess(
    tmp_path: Path, sgmse_repo: Path, torch_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the worker setup leaves in this process
    ckpt = checkpoint(tmp_path)
    log = tmp_path / "threads.log"
    table = common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{ckpt}"\nlog_file = "{log}"\n'
    adapter(tmp_path, "SGMSE", table).enhance_batch(inputs(1))
    adapter(tmp_path, "SGMSE", table + "num_threads = 3\n").enhance_batch(inputs(1))
    assert [line for line in log.read_text().splitlines() if line.startswith("threads")] == [
        f"threads {available_cores()} {available_cores()}", "threads 3 3"]


def test_progress_moves_within_a_batch(
    tmp_path: Path, sgmse_repo: Path, torch_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    class RecordingBar:
        def __init__(self, **kwargs: object) -> None:
            self.n = 0

        def __enter__(self) -> RecordingBar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, k: int) -> None:
            self.n += k
            seen.append(self.n)

    monkeypatch.setattr(external, "tqdm", RecordingBar)
    monkeypatch.setattr(external, "PROGRESS_POLL_S", 0.05)
    ckpt = checkpoint(tmp_path, sleep=0.4)  # per file, before its output is written
    sgmse = adapter(tmp_path, "SGMSE", common(sgmse_repo, torch_dirs["fake"]) + f'ckpt = "{ckpt}"\n')
    results = sgmse.enhance_batch(inputs(3), file_ids=FILE_IDS)
    assert all(isinstance(r, np.ndarray) for r in results)
    assert {1, 2} <= set(seen) and seen[-1] == 3  # counted as each output appeared, not at the end

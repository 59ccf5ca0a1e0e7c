"""The whole workflow on a small embedded corpus (`make demo`): each step runs its script and prints the command."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from serec.audio import load_audio, write_wav
from serec.fileio import atomic_path, write_json_atomic
from serec.synth import NOISE_KINDS, speech_like

REPO_ROOT = Path(__file__).resolve().parents[1]
ESPEAK = "espeak-ng"
ESPEAK_HINT = (
    "install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu; `make system-deps` does "
    "this when run as root)"
)

# Short sentences written for this demo; each speaker reads a seeded selection of them.
SENTENCES = (
    "The kettle boiled while we were still talking.",
    "Please close the window before the rain starts.",
    "A small boat drifted slowly towards the harbour.",
    "She found the keys under a pile of old letters.",
    "The train to the coast leaves at half past nine.",
    "Bring two apples and a loaf of bread.",
    "The garden looks brighter after a warm spring.",
    "He painted the fence a pale shade of green.",
    "Our meeting moved to the room on the third floor.",
    "The dog waited patiently by the front door.",
    "Turn left at the bakery and walk to the bridge.",
    "The lamp flickered twice and then went dark.",
    "Fresh snow covered the path to the old mill.",
    "They counted the coins on the kitchen table.",
    "A cold wind blew across the empty square.",
    "The library opens early on Saturday mornings.",
    "Write your name at the top of the page.",
    "The children built a castle out of sand.",
    "Thick clouds gathered over the distant hills.",
    "He poured a glass of water and sat down.",
    "The market was crowded with early shoppers.",
    "Every clock in the house showed a different time.",
    "The soup needs a little more salt.",
    "A blue bird landed on the fence post.",
    "We heard the bells ringing from across the valley.",
    "The parcel arrived two days later than promised.",
    "Keep the receipt in case the shoes do not fit.",
    "The river rose quickly after the storm.",
    "She tuned the old piano by ear.",
    "The workers finished the roof before sunset.",
    "A pot of tea is waiting on the stove.",
    "The map showed a narrow road through the forest.",
    "Move the chairs closer to the fire.",
    "The bus was late because of the heavy traffic.",
    "He wrapped the gift in plain brown paper.",
    "The orchestra played softly in the park.",
    "Lift the box with both hands and bend your knees.",
    "The candle burned down to a small stub.",
    "Her voice carried clearly across the hall.",
    "The farmer checked the fence after the storm.",
    "Green leaves floated on the surface of the pond.",
    "The baker sold the last loaf before noon.",
)


@dataclass(frozen=True)
class EspeakSpeaker:
    """One synthetic speaker: an espeak-ng voice (+ variant), pitch (0-99) and rate (words/min)."""

    voice: str
    pitch: int
    rate: int

    @property
    def name(self) -> str:
        """Speaker id for file names: no '_', so the mixing step's default speaker regex reads it."""
        return f"{self.voice.replace('+', '-')}-p{self.pitch}-s{self.rate}"


ESPEAK_SPEAKERS = (
    EspeakSpeaker("en", 40, 160),
    EspeakSpeaker("en+f3", 65, 150),
    EspeakSpeaker("en-us", 50, 175),
    EspeakSpeaker("en-us+f2", 70, 145),
    EspeakSpeaker("en-gb-scotland", 35, 155),
    EspeakSpeaker("en-gb-scotland+f4", 60, 170),
    EspeakSpeaker("en-029", 45, 140),
    EspeakSpeaker("en-029+m3", 30, 180),
    EspeakSpeaker("en-gb-x-rp", 55, 165),
    EspeakSpeaker("en-gb-x-rp+f1", 75, 150),
    EspeakSpeaker("en-us-nyc", 40, 185),
    EspeakSpeaker("en-us-nyc+m7", 50, 135),
)
# Stationary coloured noise, babble, tonal hum, impulsive bursts, amplitude-modulated noise.
DEMO_NOISES = ("pink", "brown", "babble", "hum", "impulsive", "modulated")
NOISE_SECONDS = 8.0
# The default built-ins without RNNoise: on this corpus RNNoise has the best DNSMOS OVR on
# about 80% of the files (39 of 48 in a trial run), which leaves the expert few examples
# of the other models to learn from; without it no model is best on more than about half.
DEMO_MODELS = ("webrtc", "speex", "spectral_gating", "spectral_gating_stationary")
CORPUS_JSON = "corpus.json"


class DemoError(RuntimeError):
    """A demo step could not run; the message says which and why."""


@dataclass(frozen=True)
class DemoConfig:
    output_dir: Path
    clean_dir: Path | None = None  # a user's corpus instead of the embedded one
    noise_dir: Path | None = None
    speaker_regex: str | None = None  # the mixing step's default when None
    speech: str = "auto"  # auto | espeak | synth
    models: tuple[str, ...] = DEMO_MODELS
    utterances_per_speaker: int = 8
    num_mixtures: int = 192
    test_fraction: float = 0.25
    n_folds: int = 3
    num_epochs: int = 40
    num_workers: int = 2
    seed: int = 0

    @property
    def corpus_clean(self) -> Path:
        return self.clean_dir or self.output_dir / "corpus" / "clean"

    @property
    def corpus_noise(self) -> Path:
        return self.noise_dir or self.output_dir / "corpus" / "noise"

    def path(self, name: str) -> Path:
        return self.output_dir / name


# ---------------------------------------------------------------------------------------
# The embedded corpus


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def espeak_version() -> str:
    result = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.split("  Data at")[0].strip()  # the data path is not part of the recipe


def espeak_utterance(text: str, speaker: EspeakSpeaker) -> np.ndarray:
    """espeak-ng's rendering of `text` (it writes 22.05 kHz WAV) as 16 kHz float32 mono."""
    with tempfile.TemporaryDirectory(prefix="serec-espeak-") as tmp:
        wav = Path(tmp) / "utterance.wav"
        command = [ESPEAK, "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch),
                   "-w", str(wav), text]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wav.is_file():
            raise DemoError(f"{shlex.join(command)} failed: {result.stderr.strip() or result.returncode}")
        return load_audio(wav)


def _speech_source(requested: str) -> str:
    if requested == "synth":
        return "synth"
    if espeak_available():
        return "espeak"
    if requested == "espeak":
        raise DemoError(f"--speech espeak, but {ESPEAK} is not installed; {ESPEAK_HINT}")
    print(f"note: {ESPEAK} not found, so the clean 'speech' is serec.synth's speech-like signal "
          f"(voiced syllables, not words); {ESPEAK_HINT} and delete the corpus folder to hear "
          "real synthetic voices. The workflow is the same either way.", flush=True)
    return "synth"


def corpus_recipe(speech: str, utterances_per_speaker: int, seed: int) -> dict:
    """What the corpus is a function of; a re-run reuses a corpus with the same recipe."""
    recipe = {"speech": speech, "utterances_per_speaker": utterances_per_speaker, "seed": seed,
              "noises": list(DEMO_NOISES), "noise_seconds": NOISE_SECONDS}
    if speech == "espeak":
        recipe["espeak"] = espeak_version()
        recipe["speakers"] = [asdict(s) for s in ESPEAK_SPEAKERS]
    return recipe


def build_corpus(corpus_dir: Path, *, speech: str = "auto", utterances_per_speaker: int = 8,
                 seed: int = 0) -> dict:
    """Clean speech (espeak-ng voices, or serec.synth) and the project's noises under corpus_dir.

    Writes clean/<source>_<speaker>_<utt>.wav (16 kHz), noise/synth_<kind>.wav and
    corpus.json (the recipe and counts). A folder holding the same recipe is reused as is;
    one made with another recipe is an error (its files would mix with the new ones).
    Returns the corpus.json content.
    """
    recipe = corpus_recipe(_speech_source(speech), utterances_per_speaker, seed)
    marker = corpus_dir / CORPUS_JSON
    if marker.is_file():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous.get("recipe") == recipe:
            return previous
        raise DemoError(f"{corpus_dir} holds a corpus made with other settings ({marker}); "
                        "delete that folder or choose another --output_dir")
    rng = np.random.default_rng(seed)
    clean_dir, noise_dir = corpus_dir / "clean", corpus_dir / "noise"
    n_clean = 0
    if recipe["speech"] == "espeak":
        for speaker in ESPEAK_SPEAKERS:
            for utt, index in enumerate(rng.choice(len(SENTENCES), utterances_per_speaker, replace=False)):
                audio = espeak_utterance(SENTENCES[index], speaker)
                write_wav(clean_dir / f"espeak_{speaker.name}_{utt:04d}.wav", audio)
                n_clean += 1
    else:
        for number in range(len(ESPEAK_SPEAKERS)):
            f0 = float(rng.uniform(100, 250))  # one voice per speaker
            for utt in range(utterances_per_speaker):
                audio = speech_like(rng, float(rng.uniform(2.0, 3.5)), f0=f0)
                write_wav(clean_dir / f"synth_spk{number + 1:02d}_{utt:04d}.wav", audio)
                n_clean += 1
    for kind in DEMO_NOISES:
        write_wav(noise_dir / f"synth_{kind}.wav", NOISE_KINDS[kind](rng, NOISE_SECONDS))
    content = {"recipe": recipe, "clean_files": n_clean, "noise_files": len(DEMO_NOISES)}
    write_json_atomic(marker, content)
    return content


# ---------------------------------------------------------------------------------------
# Running the scripts


def _shown(path: Path | str) -> str:
    """A path as the user would type it: relative when it is inside the current folder."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# Exit statuses that mean "finished, but some files were left out or failed": the demo
# goes on and says where to look.
PARTIAL_EXIT = {
    "preprocessing/speech_noise_mixing.py": (1, "skipped.csv"),
    "enhancement_driver.py": (3, "scores.csv (status=error)"),
    "preprocess_features.py": (1, "errors.csv"),
    "model_recommender_w_scaler.py": (1, "skipped_files.csv"),
    "recommendation_driver.py": (3, "errors.csv, routing.csv, evaluation.csv"),
}


def run_script(script: str, args: Sequence[str | Path | int | float]) -> int:
    """Print the command line, run it with this Python, stop the demo on a hard failure."""
    shown = ["python", script, *(_shown(a) if isinstance(a, Path) else str(a) for a in args)]
    print(f"$ {shlex.join(shown)}", flush=True)
    path = REPO_ROOT / script
    if not path.is_file():
        raise DemoError(f"{path}: not found; run the demo from a source checkout (pip install -e .)")
    status = subprocess.run([sys.executable, str(path), *map(str, args)]).returncode
    partial_status, where = PARTIAL_EXIT[script]
    if status == partial_status:
        print(f"note: {script} finished but left some files out (exit {status}); see {where}", flush=True)
    elif status != 0:
        raise DemoError(f"{script} failed (exit status {status}); its messages are above")
    return status


# ---------------------------------------------------------------------------------------
# The steps


def corpus_step(config: DemoConfig) -> None:
    """The embedded corpus: espeak-ng voices and the project's noises (or your --clean_dir/--noise_dir)."""
    if config.clean_dir is not None:
        print(f"using your corpus: clean {config.clean_dir}, noise {config.noise_dir}")
        return
    content = build_corpus(config.path("corpus"), speech=config.speech,
                           utterances_per_speaker=config.utterances_per_speaker, seed=config.seed)
    recipe = content["recipe"]
    source = f"{recipe['espeak']}, {len(recipe['speakers'])} voices" if recipe["speech"] == "espeak" else "serec.synth"
    print(f"corpus: {content['clean_files']} clean files ({source}) in {_shown(config.corpus_clean)}, "
          f"{content['noise_files']} noises ({', '.join(recipe['noises'])}) in {_shown(config.corpus_noise)}")


def mixing_step(config: DemoConfig) -> None:
    """Workflow step 1: noisy/clean pairs at -5..20 dB SNR, speakers split into train and test."""
    run_script("preprocessing/speech_noise_mixing.py", [
        "--clean_dir", config.corpus_clean, "--noise_dir", config.corpus_noise,
        "--output_dir", config.path("mixtures"), "--num_mixtures", config.num_mixtures,
        "--seed", config.seed, "--test_fraction", config.test_fraction,
        "--num_workers", config.num_workers,
        *(["--speaker_regex", config.speaker_regex] if config.speaker_regex else []),
    ])


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    link.unlink(missing_ok=True)
    link.symlink_to(relative)


def split_folders(mixtures: Path, output_dir: Path) -> dict[str, int]:
    """OUTPUT/<split>/{noisy,clean}/ (links to the mixtures) and OUTPUT/<split>/metadata.csv.

    The recommender learns from `train` only; `test` (speakers it never saw) plays the new
    recordings. Links no longer listed in metadata.csv are removed, so a re-run matches it.
    """
    metadata = pd.read_csv(mixtures / "metadata.csv")
    counts = {}
    for split in ("train", "test"):
        rows = metadata[metadata.split == split]
        if rows.empty:
            raise DemoError(f"{mixtures / 'metadata.csv'}: no mixture in split {split!r}; "
                            "the corpus needs at least two speakers")
        for kind in ("noisy", "clean"):
            folder = output_dir / split / kind
            for fid in rows.file:
                _link(mixtures / kind / fid, folder / fid)
            listed = {folder / fid for fid in rows.file}
            for stale in [p for p in folder.rglob("*") if p.is_symlink() and p not in listed]:
                stale.unlink()
        with atomic_path(output_dir / split / "metadata.csv") as tmp:
            rows.to_csv(tmp, index=False)
        counts[split] = len(rows)
    return counts


def split_step(config: DemoConfig) -> None:
    """train/ and test/ folders, so the recommender learns from train only and test plays new recordings."""
    counts = split_folders(config.path("mixtures"), config.output_dir)
    metadata = pd.read_csv(config.path("mixtures") / "metadata.csv")
    speakers = metadata.groupby("split").speaker.nunique()
    print(f"split (the demo links split == train / test mixtures into their own folders): "
          f"{counts['train']} train mixtures ({speakers['train']} speakers) in "
          f"{_shown(config.path('train'))}, {counts['test']} test mixtures ({speakers['test']} unseen "
          f"speakers) in {_shown(config.path('test'))}")


def enhancement_step(config: DemoConfig) -> None:
    """Workflow step 2: every model on every file of both splits, scored and labelled."""
    for split in ("train", "test"):
        run_script("enhancement_driver.py", [
            "--noisy_dir", config.path(split) / "noisy", "--clean_dir", config.path(split) / "clean",
            "--output_dir", config.path(f"enhancement_{split}"), "--models", *config.models,
            "--num_workers", config.num_workers,
        ])


def features_step(config: DemoConfig) -> None:
    """Workflow step 3: CE/KL features of the training files (step 5 computes the test files' itself)."""
    run_script("preprocess_features.py", [
        "--base_data_dir", config.path("train") / "noisy",
        "--output_base_dir", config.path("features_train"), "--num_workers", config.num_workers,
    ])


def recommender_step(config: DemoConfig) -> None:
    """Workflow step 4: gatekeeper, expert and single model on speaker-grouped folds, then the F1 table."""
    common = [
        "--labels_csv", config.path("enhancement_train") / "labels.csv",
        "--audio_dir", config.path("train") / "noisy",
        "--metadata_csv", config.path("train") / "metadata.csv",
        "--cekl_features_base_dir", config.path("features_train"),
        "--output_dir", config.path("recommender"),
        "--pretrained_models", "none", "--ast_size", "tiny", "--use_hybrid_features",
        "--use_weighted_sampler", "--learning_rate", "5e-4", "--n_folds", config.n_folds,
        "--num_epochs", config.num_epochs, "--patience", max(2, config.num_epochs // 3),
    ]
    for stage in ("gatekeeper", "expert", "single", "evaluate_pipeline"):
        run_script("model_recommender_w_scaler.py", ["--training_stage", stage, *common])


def recommendation_step(config: DemoConfig) -> None:
    """Workflow step 5: route the unseen test speakers' files with fold 1's models, enhance, compare."""
    recommender = config.path("recommender")
    run_script("recommendation_driver.py", [
        "--noisy_speech_dir", config.path("test") / "noisy",
        "--enhanced_dir", config.path("recommendation"),
        "--gatekeeper_model_path", recommender / "gatekeeper_model_fold_1_best.pth",
        "--expert_model_path", recommender / "expert_model_fold_1_best_hybrid.pth",
        "--single_model_path", recommender / "single_model_fold_1_best.pth",
        "--use_hybrid_features",
        "--clean_speech_dir", config.path("test") / "clean",
        "--labels_csv", config.path("enhancement_test") / "labels.csv",
        "--num_workers", config.num_workers,
    ])


STRATEGY_TABLE_COLUMNS = {
    "strategy": "strategy", "dnsmos_ovr": "OVR", "pesq_wb": "PESQ-WB", "stoi": "STOI",
    "oracle_gain_captured": "captured", "enhancer_seconds": "enhancer_s",
    "recommender_seconds": "recommend_s", "dnsmos_seconds": "dnsmos_s", "total_seconds": "total_s",
}


def results_tables(output_dir: Path) -> str:
    """The macro F1 table (step 4) and the adaptive-vs-oracle strategies (step 5), from their files."""
    # Imported here: serec.evaluation loads torch (seconds), which the corpus builder does not need.
    from serec.evaluation import format_table

    metrics = json.loads((output_dir / "recommender" / "evaluate_pipeline" / "metrics.json").read_text())
    n_folds = len(metrics["folds_evaluated"])
    f1 = format_table(metrics["summary"], f"Recommender: macro F1 on {n_folds} held-out folds of the "
                      f"training speakers (mean ± std; classes {', '.join(metrics['class_names'])})")
    strategies = pd.read_csv(output_dir / "recommendation" / "strategies.csv")
    table = strategies[list(STRATEGY_TABLE_COLUMNS)].rename(columns=STRATEGY_TABLE_COLUMNS)
    table["captured"] = table["captured"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.0f}%")
    text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")
    return (f"{f1}\n\nAdaptive selection vs fixed models and the oracle on the "
            f"{int(strategies.files.iloc[0])} test files (unseen speakers; scores from "
            f"enhancement_test/scores.csv, captured = share of the oracle's OVR gain over the best "
            f"single model)\n{text}")


Step = Callable[[DemoConfig], None]
STEPS: list[tuple[str, Step]] = [
    ("corpus", corpus_step),
    ("mixing", mixing_step),
    ("split", split_step),
    ("enhancement", enhancement_step),
    ("features", features_step),
    ("recommender", recommender_step),
    ("recommendation", recommendation_step),
]


def run_demo(config: DemoConfig) -> Path:
    """Every step in order (each resumes what an earlier run did); returns report.html."""
    started = time.perf_counter()
    for number, (name, step) in enumerate(STEPS, start=1):
        step_started = time.perf_counter()
        print(f"\n[{number}/{len(STEPS)}] {name}: {step.__doc__.splitlines()[0]}", flush=True)
        step(config)
        print(f"[{number}/{len(STEPS)}] {name} done in {time.perf_counter() - step_started:.1f} s", flush=True)
    report = config.path("recommendation") / "report.html"
    print("\n" + "=" * 100 + "\n" + results_tables(config.output_dir))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is under "
          f"{_shown(config.output_dir)}\nreport: {report.resolve()}")
    return report


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("demo_out"), help="everything goes here")
    p.add_argument("--clean_dir", type=Path, help="your clean speech instead of the embedded corpus")
    p.add_argument("--noise_dir", type=Path, help="your noise (with --clean_dir)")
    p.add_argument("--speaker_regex",
                   help="for your corpus: the mixing step's --speaker_regex (speaker id from the clean file name)")
    p.add_argument("--speech", choices=("auto", "espeak", "synth"), default="auto",
                   help="embedded clean speech: espeak-ng voices, serec.synth's speech-like "
                   "signals, or auto (espeak-ng when installed, else synth with a note)")
    p.add_argument("--utterances_per_speaker", type=int, default=DemoConfig.utterances_per_speaker,
                   help=f"sentences per embedded voice ({len(ESPEAK_SPEAKERS)} voices)")
    p.add_argument("--num_mixtures", type=int, default=DemoConfig.num_mixtures,
                   help="mixtures to make; a quarter of the speakers are held out as new recordings")
    p.add_argument("--models", nargs="+", default=list(DEMO_MODELS),
                   help="enhancers to compare (RNNoise is left out by default: it wins most files "
                   "of this corpus, leaving the expert little to learn)")
    p.add_argument("--n_folds", type=int, default=DemoConfig.n_folds, help="recommender folds")
    p.add_argument("--num_epochs", type=int, default=DemoConfig.num_epochs, help="recommender epochs")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes of the mixing, enhancement, feature and recommendation steps")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="corpus and mixing seed")
    args = p.parse_args(argv)
    if (args.clean_dir is None) != (args.noise_dir is None):
        p.error("give both --clean_dir and --noise_dir (a corpus of your own), or neither")
    return DemoConfig(
        output_dir=args.output_dir, clean_dir=args.clean_dir, noise_dir=args.noise_dir,
        speaker_regex=args.speaker_regex, speech=args.speech, models=tuple(args.models),
        utterances_per_speaker=args.utterances_per_speaker, num_mixtures=args.num_mixtures,
        n_folds=args.n_folds, num_epochs=args.num_epochs, num_workers=args.num_workers,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        run_demo(config)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run `make demo` again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

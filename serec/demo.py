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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serec.audio import load_audio, write_wav
from serec.enhancers import DEFAULT_MODELS
from serec.fileio import write_json_atomic
from serec.pipeline import (
    PipelineConfig,
    PipelineError,
    bind,
    bound_steps,
    results_tables,
    run_steps,
    shown,
)
from serec.synth import NOISE_KINDS, speech_like

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
# The enhancement driver's default zoo (one model per family, neural and DSP).
DEMO_MODELS = DEFAULT_MODELS
CORPUS_JSON = "corpus.json"


class DemoError(PipelineError):
    """The embedded corpus could not be built; the message says which and why."""


@dataclass(frozen=True)
class DemoConfig:
    output_dir: Path
    clean_dir: Path | None = None  # a user's corpus instead of the embedded one
    noise_dir: Path | None = None
    speaker_regex: str | None = None  # the mixing step's default when None
    speech: str = "auto"  # auto | espeak | synth
    models: tuple[str, ...] = DEMO_MODELS
    utterances_per_speaker: int = 8
    # 96: the neural zoo scores six systems per file; 192 took 26 min on a 2-core CPU (BENCHMARKS).
    num_mixtures: int = 96
    test_fraction: float = 0.25
    n_folds: int = 3
    num_epochs: int = 40
    num_workers: int = 2
    seed: int = 0
    # Off by default: the selector's DNSMOS-embedding features run DNSMOS twice more per file.
    quality_selector: bool = False

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
# The demo: the corpus, then the workflow


def corpus_step(config: DemoConfig) -> None:
    """The embedded corpus: espeak-ng voices and the project's noises (or your --clean_dir/--noise_dir)."""
    if config.clean_dir is not None:
        print(f"using your corpus: clean {config.clean_dir}, noise {config.noise_dir}")
        return
    content = build_corpus(config.path("corpus"), speech=config.speech,
                           utterances_per_speaker=config.utterances_per_speaker, seed=config.seed)
    recipe = content["recipe"]
    source = f"{recipe['espeak']}, {len(recipe['speakers'])} voices" if recipe["speech"] == "espeak" else "serec.synth"
    print(f"corpus: {content['clean_files']} clean files ({source}) in {shown(config.corpus_clean)}, "
          f"{content['noise_files']} noises ({', '.join(recipe['noises'])}) in {shown(config.corpus_noise)}")


def pipeline_config(config: DemoConfig) -> PipelineConfig:
    return PipelineConfig(
        output_dir=config.output_dir, clean_dir=config.corpus_clean, noise_dir=config.corpus_noise,
        speaker_regex=config.speaker_regex, models=config.models, num_mixtures=config.num_mixtures,
        test_fraction=config.test_fraction, n_folds=config.n_folds, num_epochs=config.num_epochs,
        num_workers=config.num_workers, seed=config.seed, quality_selector=config.quality_selector,
    )


def run_demo(config: DemoConfig) -> Path:
    """Every step in order (each resumes what an earlier run did); returns report.html."""
    started = time.perf_counter()
    run_steps([("corpus", bind(corpus_step, config)), *bound_steps(pipeline_config(config))])
    report = config.path("recommendation") / "report.html"
    print("\n" + "=" * 100 + "\n" + results_tables(config.output_dir))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is under "
          f"{shown(config.output_dir)}\nreport: {report.resolve()}")
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
                   help="enhancers to compare (the enhancement driver's default zoo)")
    p.add_argument("--n_folds", type=int, default=DemoConfig.n_folds, help="recommender folds")
    p.add_argument("--num_epochs", type=int, default=DemoConfig.num_epochs, help="recommender epochs")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes of the mixing, enhancement, feature and recommendation steps")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="corpus and mixing seed")
    p.add_argument("--quality_selector", action="store_true",
                   help="also train the quality selector and score its routing policies (slower: DNSMOS "
                   "embeddings of every file)")
    args = p.parse_args(argv)
    if (args.clean_dir is None) != (args.noise_dir is None):
        p.error("give both --clean_dir and --noise_dir (a corpus of your own), or neither")
    return DemoConfig(
        output_dir=args.output_dir, clean_dir=args.clean_dir, noise_dir=args.noise_dir,
        speaker_regex=args.speaker_regex, speech=args.speech, models=tuple(args.models),
        utterances_per_speaker=args.utterances_per_speaker, num_mixtures=args.num_mixtures,
        n_folds=args.n_folds, num_epochs=args.num_epochs, num_workers=args.num_workers,
        seed=args.seed, quality_selector=args.quality_selector,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        run_demo(config)
    except PipelineError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run `make demo` again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

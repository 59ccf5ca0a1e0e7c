"""The five steps run in order on one corpus, each through its command's `main` in this process:
the steps shared by `make demo` and the experiment."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from serec.exitcodes import ExitStatus
from serec.fileio import UnsafeFileId, atomic_path, check_file_ids
from serec.quality import METRICS
from serec.runinfo import RUN_JSON
from serec.schema import HEADLINE_METRICS
from serec.selection import selector_checkpoint, selector_record_dir


class PipelineError(RuntimeError):
    """A step could not run; the message says which and why."""


@dataclass(frozen=True)
class PipelineConfig:
    """Where the corpus is, where everything goes, and the settings every step shares."""

    output_dir: Path
    clean_dir: Path
    noise_dir: Path
    speaker_regex: str | None = None  # the mixing step's default when None
    models: tuple[str, ...] | None = None  # the enhancement driver's defaults when None
    models_config: Path | None = None  # TOML of external models (SGMSE, StoRM, CDiffuSE)
    num_mixtures: int = 192
    test_fraction: float = 0.25
    # Share of noise recordings held out for test (None: test_fraction), so test mixtures
    # are made of unseen speakers AND unseen noise recordings, as in deployment.
    noise_test_fraction: float | None = None
    # DNSMOS of every system at one active-speech level (dBFS; None: as it is). DNSMOS
    # rewards quieter output; at a common level the labels compare enhancement, not
    # loudness (README: "Scoring at a common level").
    dnsmos_level_db: float | None = -26.0
    n_folds: int = 3
    num_epochs: int = 40
    num_workers: int = 2
    # Where steps 2, 3 and 5 run their per-file work: "local" or "ray" (at ray_address; None:
    # a local Ray instance, started once and shared by the steps).
    backend: str = "local"
    ray_address: str | None = None
    # The quality selector beside the thesis's classifiers: DNSMOS-embedding features of both
    # splits (step 3), its predictor stage (step 4) and every routing policy's row (step 5).
    quality_selector: bool = True
    # Other gain learners (serec.predictor.LEARNERS, e.g. "ast") trained beside the default one
    # on the same folds, features and targets (step 4) and evaluated on the test split (step 5):
    # reported in the experiment's tables, never used to route.
    compare_learners: tuple[str, ...] = ()
    # The scoring-level check: the first N training files' DNSMOS re-scored the other way (as is
    # when the run scores at dnsmos_level_db), labels and headroom compared; 0 leaves it out.
    level_check_files: int = 0
    seed: int = 0  # mixing, enhancement and recommendation
    recommender_seed: int = 42  # folds, initialisation and sampling of model_recommender_w_scaler.py

    def path(self, name: str) -> Path:
        return self.output_dir / name


def shown(path: Path | str) -> str:
    """A path as the user would type it: relative when it is inside the current folder."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return str(path)


@dataclass(frozen=True)
class Command:
    """A step's command: the script that runs it from a checkout, and its `main` in serec.cli."""

    script: str
    module: str
    partial_where: str  # where a run that left files out lists them


COMMANDS = {
    "mixing": Command("preprocessing/speech_noise_mixing.py", "serec.cli.speech_noise_mixing",
                      "skipped.csv"),
    "enhancement": Command("enhancement_driver.py", "serec.cli.enhancement_driver",
                           "scores.csv (status=error)"),
    "features": Command("preprocess_features.py", "serec.cli.preprocess_features", "errors.csv"),
    "recommender": Command("model_recommender_w_scaler.py", "serec.cli.model_recommender_w_scaler",
                           "skipped_files.csv"),
    "recommendation": Command("recommendation_driver.py", "serec.cli.recommendation_driver",
                              "errors.csv, routing.csv, evaluation.csv"),
    "selection": Command("-m serec.selection", "serec.selection", "strategies.csv"),
}  # fmt: skip


def _argv(args: Sequence[str | Path | int | float]) -> list[str]:
    return [shown(a) if isinstance(a, Path) else str(a) for a in args]


def run_command(step: str, args: Sequence[str | Path | int | float]) -> ExitStatus:
    """Print the step's command line, run its `main` in this process, raise PipelineError on a
    hard failure (KeyboardInterrupt on Ctrl-C); a PARTIAL run is a note and the steps go on."""
    command = COMMANDS[step]
    argv = _argv(args)
    print(f"$ {shlex.join(['python', *command.script.split(), *argv])}", flush=True)
    main = importlib.import_module(command.module).main
    saved_argv = sys.argv
    # run.json records sys.argv: the step's own command line, not the pipeline's.
    sys.argv = [command.script, *argv]
    try:
        status = ExitStatus(main(argv))
    finally:
        sys.argv = saved_argv
    if status == ExitStatus.INTERRUPTED:
        raise KeyboardInterrupt
    if status == ExitStatus.PARTIAL:
        print(f"note: {command.script} finished but left some files out (exit {status}); "
              f"see {command.partial_where}", flush=True)
    elif status != ExitStatus.OK:
        raise PipelineError(f"{command.script} failed (exit status {int(status)}); its messages "
                            "are above")
    return status


def run_unless_done(step: str, args: Sequence[str | Path | int | float], record_dir: Path, finished: str,
                    newer_than: Path | None = None) -> None:
    """run_command, unless RECORD_DIR/run.json says this very command line finished (it holds
    `finished`, which the command writes last) after `newer_than` changed: for commands that
    redo everything when run again, so a resumed run skips them as the other steps skip
    their finished work."""
    argv, record = _argv(args), record_dir / RUN_JSON
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        fresh = newer_than is None or record.stat().st_mtime >= newer_than.stat().st_mtime
    except (OSError, ValueError):
        saved, fresh = {}, False
    if fresh and isinstance(saved, dict) and finished in saved and saved.get("command", [])[1:] == argv:
        print(f"$ {shlex.join(['python', *COMMANDS[step].script.split(), *argv])}\n  done before "
              f"({shown(record)} records this command finished; delete it to run it again)", flush=True)
        return
    run_command(step, args)


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
    metadata = pd.read_csv(mixtures / "metadata.csv", dtype={"file": str})
    try:
        check_file_ids(metadata.file, mixtures / "metadata.csv")  # joined to the links' folders
    except UnsafeFileId as exc:
        raise PipelineError(str(exc)) from exc
    counts = {}
    for split in ("train", "test"):
        rows = metadata[metadata.split == split]
        if rows.empty:
            raise PipelineError(f"{mixtures / 'metadata.csv'}: no mixture in split {split!r}; "
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


# ---------------------------------------------------------------------------------------
# The steps


def mixing_step(config: PipelineConfig) -> None:
    """Workflow step 1: noisy/clean pairs at -5..20 dB SNR, speakers split into train and test."""
    run_command("mixing", [
        "--clean_dir", config.clean_dir, "--noise_dir", config.noise_dir,
        "--output_dir", config.path("mixtures"), "--num_mixtures", config.num_mixtures,
        "--seed", config.seed, "--test_fraction", config.test_fraction,
        "--noise_test_fraction",
        config.test_fraction if config.noise_test_fraction is None else config.noise_test_fraction,
        "--num_workers", config.num_workers,
        *(["--speaker_regex", config.speaker_regex] if config.speaker_regex else []),
    ])


def split_step(config: PipelineConfig) -> None:
    """train/ and test/ folders, so the recommender learns from train only and test plays new recordings."""
    counts = split_folders(config.path("mixtures"), config.output_dir)
    metadata = pd.read_csv(config.path("mixtures") / "metadata.csv")
    speakers = metadata.groupby("split").speaker.nunique()
    noises = metadata.groupby("split").noise_source.nunique()
    shared = set(metadata[metadata.split == "train"].noise_source) & set(metadata[metadata.split == "test"].noise_source)
    print(f"split (split == train / test mixtures linked into their own folders): "
          f"{counts['train']} train mixtures ({speakers['train']} speakers, {noises['train']} noise "
          f"recordings) in {shown(config.path('train'))}, {counts['test']} test mixtures "
          f"({speakers['test']} unseen speakers, {noises['test']} noise recordings, {len(shared)} of them "
          f"also in train) in {shown(config.path('test'))}")


def _backend_args(config: PipelineConfig) -> list[str]:
    """The --backend and --ray_address flags of the steps that fan out per-file work."""
    if config.backend == "local":
        return []
    return ["--backend", config.backend, *(["--ray_address", config.ray_address] if config.ray_address else [])]


def enhancement_step(config: PipelineConfig) -> None:
    """Workflow step 2: every model on every file of both splits, scored and labelled."""
    for split in ("train", "test"):
        run_command("enhancement", [
            "--noisy_dir", config.path(split) / "noisy", "--clean_dir", config.path(split) / "clean",
            "--output_dir", config.path(f"enhancement_{split}"),
            *(["--models", *config.models] if config.models else []),
            *(["--models_config", config.models_config] if config.models_config else []),
            "--num_workers", config.num_workers, "--seed", config.seed,
            *(["--dnsmos_level_db", config.dnsmos_level_db] if config.dnsmos_level_db is not None else []),
            *_backend_args(config),
        ])


LEVEL_CHECK_DIR = "level_check_train"


def level_check_step(config: PipelineConfig) -> None:
    """Scoring level: the first training files' DNSMOS re-scored the other way, labels and headroom compared."""
    # Imported here: the demo, which leaves the check out, never needs it.
    from serec.level_check import (
        DEFAULT_LEVEL_DB,
        LevelCheckError,
        run_level_check,
        summary_sentence,
    )
    from serec.lock import OutputLocked
    from serec.ray_backend import backend_from_args
    from serec.schema import SchemaError

    backend = backend_from_args(argparse.Namespace(backend=config.backend, ray_address=config.ray_address),
                                config.num_workers, isolate=True)
    out_dir = config.path(LEVEL_CHECK_DIR)
    print(f"re-scoring the DNSMOS OVR of the first {config.level_check_files} training files into "
          f"{shown(out_dir)} (training split only: the protocol never tunes on test)", flush=True)
    try:
        summary = run_level_check(
            config.path("enhancement_train"), config.path("train") / "noisy", out_dir,
            max_files=config.level_check_files, backend=backend,
            level_db=DEFAULT_LEVEL_DB if config.dnsmos_level_db is None else config.dnsmos_level_db)
    except (LevelCheckError, SchemaError, UnsafeFileId, OutputLocked) as exc:
        raise PipelineError(f"level check: {exc}") from exc
    print(summary_sentence(summary), flush=True)


SELECTOR_FEATURE_SET = "dnsmos_embed"


def selector_features(config: PipelineConfig, split: str) -> Path:
    return config.path(f"features_{split}_{SELECTOR_FEATURE_SET}")


def features_step(config: PipelineConfig) -> None:
    """Workflow step 3: CE/KL features of the training files (step 5 computes the test files' itself),
    and the quality selector's DNSMOS-embedding features of both splits."""
    run_command("features", [
        "--base_data_dir", config.path("train") / "noisy",
        "--output_base_dir", config.path("features_train"), "--num_workers", config.num_workers,
        *_backend_args(config),
    ])
    if config.quality_selector:
        for split in ("train", "test"):
            run_command("features", [
                "--base_data_dir", config.path(split) / "noisy", "--output_base_dir", selector_features(config, split),
                "--feature_set", SELECTOR_FEATURE_SET, "--num_workers", config.num_workers, *_backend_args(config),
            ])


def _ast_flags(config: PipelineConfig) -> list[str | int]:
    """The AST's size and training flags, the same for the thesis's stages and the ast gain learner."""
    return ["--pretrained_models", "none", "--ast_size", "tiny", "--learning_rate", "5e-4",
            "--num_epochs", config.num_epochs, "--patience", max(2, config.num_epochs // 3)]


def compared_learners(config: PipelineConfig) -> tuple[str, ...]:
    """The gain learners trained and evaluated beside the default one (none without the selector)."""
    return config.compare_learners if config.quality_selector else ()


def recommender_step(config: PipelineConfig) -> None:
    """Workflow step 4: gatekeeper, expert and single model, the F1 table, and the quality selector,
    all on the same folds (REC/folds.csv), disjoint in speakers and noise recordings."""
    common = [
        "--labels_csv", config.path("enhancement_train") / "labels.csv",
        "--audio_dir", config.path("train") / "noisy",
        "--metadata_csv", config.path("train") / "metadata.csv",
        "--cekl_features_base_dir", config.path("features_train"),
        "--output_dir", config.path("recommender"), *_ast_flags(config), "--use_hybrid_features",
        "--use_weighted_sampler", "--n_folds", config.n_folds, "--seed", config.recommender_seed, "--refit",
    ]
    for stage in ("gatekeeper", "expert", "single", "evaluate_pipeline"):
        run_command("recommender", ["--training_stage", stage, *common])
    if not config.quality_selector:
        return
    predictor = [
        "--training_stage", "predictor", "--labels_csv", config.path("enhancement_train") / "labels.csv",
        "--metadata_csv", config.path("train") / "metadata.csv",
        "--cekl_features_base_dir", selector_features(config, "train"),
        "--output_dir", config.path("recommender"), "--n_folds", config.n_folds,
        "--seed", config.recommender_seed,
    ]
    run_command("recommender", predictor)
    for learner in compared_learners(config):  # the same folds, features and targets
        run_unless_done("recommender", [*predictor, "--predictor_learner", learner,
                                        "--audio_dir", config.path("train") / "noisy", *_ast_flags(config)],
                        config.path("recommender") / selector_record_dir(learner), "selector_training")


def recommendation_step(config: PipelineConfig) -> None:
    """Workflow step 5: route the unseen test speakers' files with the models refitted on every
    training file, enhance, compare."""
    recommender = config.path("recommender")
    run_command("recommendation", [
        "--noisy_speech_dir", config.path("test") / "noisy",
        "--enhanced_dir", config.path("recommendation"),
        "--gatekeeper_model_path", recommender / "gatekeeper_model_fold_all_best.pth",
        "--expert_model_path", recommender / "expert_model_fold_all_best_hybrid.pth",
        "--single_model_path", recommender / "single_model_fold_all_best.pth",
        "--use_hybrid_features",
        "--clean_speech_dir", config.path("test") / "clean",
        "--labels_csv", config.path("enhancement_test") / "labels.csv",
        *(["--models_config", config.models_config] if config.models_config else []),
        *(["--selector", recommender / selector_checkpoint(), "--selector_features_dir",
           selector_features(config, "test")] if config.quality_selector else []),
        "--num_workers", config.num_workers, "--seed", config.seed,
        *_backend_args(config),
    ])
    for learner in compared_learners(config):  # every policy of the other learners, scored from scores.csv
        selector = recommender / selector_checkpoint(learner)
        out_dir = learner_evaluation_dir(config.output_dir, learner)
        run_unless_done("selection", [
            "evaluate", "--selector", selector, "--labels_csv", config.path("enhancement_test") / "labels.csv",
            "--features_dir", selector_features(config, "test"), "--noisy_dir", config.path("test") / "noisy",
            "--output_dir", out_dir, "--seed", config.seed,
        ], out_dir, "timing", newer_than=selector)


def learner_evaluation_dir(output_dir: Path, learner: str) -> Path:
    """Where step 5 evaluates another learner's selector: OUTPUT/recommendation/selector_<learner>/."""
    return output_dir / "recommendation" / Path(selector_checkpoint(learner)).stem


Step = Callable[[PipelineConfig], None]
WORKFLOW_STEPS: list[tuple[str, Step]] = [
    ("mixing", mixing_step),
    ("split", split_step),
    ("enhancement", enhancement_step),
    ("level_check", level_check_step),  # only with level_check_files > 0 (the experiment)
    ("features", features_step),
    ("recommender", recommender_step),
    ("recommendation", recommendation_step),
]


def run_steps(steps: Sequence[tuple[str, Callable[[], None]]],
              on_step_end: Callable[[str, float, bool], None] | None = None) -> None:
    """Each step in order, with a header and its wall time; every step resumes what a run before it did.

    on_step_end(name, seconds, finished) is called after each step, and also with
    finished=False for the step a Ctrl-C or an error stopped, so its time is not lost.
    """
    for number, (name, step) in enumerate(steps, start=1):
        doc = (step.__doc__ or name).splitlines()[0]
        print(f"\n[{number}/{len(steps)}] {name}: {doc}", flush=True)
        started = time.perf_counter()
        finished = False
        try:
            step()
            finished = True
        finally:
            seconds = time.perf_counter() - started
            if on_step_end is not None:
                on_step_end(name, seconds, finished)
        print(f"[{number}/{len(steps)}] {name} done in {seconds:.1f} s", flush=True)


def bind(step: Callable[[Any], None], config: Any) -> Callable[[], None]:
    """step(config) as a call without arguments that keeps the step's docstring (run_steps prints it)."""
    def run() -> None:
        step(config)
    run.__doc__ = step.__doc__
    return run


def bound_steps(config: PipelineConfig) -> list[tuple[str, Callable[[], None]]]:
    """WORKFLOW_STEPS with the config bound (the level check only with level_check_files > 0)."""
    return [(name, bind(step, config)) for name, step in WORKFLOW_STEPS
            if name != "level_check" or config.level_check_files > 0]


# ---------------------------------------------------------------------------------------
# The tables of steps 4 and 5

STRATEGY_TABLE_COLUMNS = {
    "strategy": "strategy", **{m: METRICS[m].heading for m in HEADLINE_METRICS},
    "gain_over_best_single": "gain", "gain_ci_low": "ci_low", "gain_ci_high": "ci_high",
    "oracle_gain_captured": "captured", "total_seconds": "total_s", "compute_vs_best_single": "x_compute",
}


def results_tables(output_dir: Path) -> str:
    """The macro F1 table (step 4) and the adaptive-vs-oracle strategies (step 5), from their files."""
    # Imported here: the recommender package loads torch (seconds), which the corpus builder
    # does not need.
    from serec.recommender.crossval_report import format_table

    metrics = json.loads((output_dir / "recommender" / "evaluate_pipeline" / "metrics.json").read_text())
    n_folds = len(metrics["folds_evaluated"])
    f1 = format_table(metrics["summary"], f"Recommender: macro F1 on {n_folds} held-out folds of the "
                      f"training speakers (mean ± std; classes {', '.join(metrics['class_names'])})")
    strategies = pd.read_csv(output_dir / "recommendation" / "strategies.csv")
    table = strategies[list(STRATEGY_TABLE_COLUMNS)].rename(columns=STRATEGY_TABLE_COLUMNS)
    table["captured"] = table["captured"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.0f}%")
    text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")
    from serec.strategies import verdict

    return (f"{f1}\n\nverdict: {verdict(strategies.to_dict('records'))}\n\n"
            f"Adaptive selection vs fixed models and the oracle on the "
            f"{int(strategies.files.iloc[0])} test files (unseen speakers; scores from "
            f"enhancement_test/scores.csv, captured = share of the oracle's OVR gain over the best "
            f"single model)\n{text}")

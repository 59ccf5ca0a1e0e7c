"""Train and evaluate the two-stage recommender (gatekeeper + expert) on shared k folds.

Run the stages in order with the same --output_dir, --labels_csv and --seed:

  python model_recommender_w_scaler.py --training_stage gatekeeper --labels_csv OUT/labels.csv \\
      --audio_dir OUT/noisy --metadata_csv MIX/metadata.csv --output_dir REC \\
      --pretrained_models none --ast_size tiny
  ... --training_stage expert ...; ... --training_stage single ...
  ... --training_stage evaluate_pipeline --cekl_features_base_dir FEAT
  ... --training_stage predictor --cekl_features_base_dir FEAT_EMBED (the quality selector:
      per-model gain regressors on folds disjoint in speakers and noise recordings; needs
      --metadata_csv; writes REC/selector.pth and REC/predictor/run.json, see python -m
      serec.selection; --predictor_learner ast: the hybrid AST with a regression head, needs
      --audio_dir and takes the AST and training flags above, and writes
      REC/selector_ast.pth and REC/predictor_ast/run.json, so both learners share REC/folds.csv)

Each training stage writes REC/<checkpoint per fold>, REC/<stage>/ (metrics, curves,
confusion matrices); evaluate_pipeline writes REC/evaluate_pipeline/ and prints the table.
Exit status: 0 done; 3 done, but some files were skipped (REC/<stage>/skipped_files.csv);
2 bad flags, data or checkpoints (one line says which and how to fix it); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from serec.exitcodes import ExitStatus
from serec.lock import OutputLocked, output_lock
from serec.predictor import DEFAULT_LEARNER, LEARNERS, PredictorError
from serec.recommender.ast_model import AST_SIZES, PRETRAINED_CHOICES
from serec.recommender.config import FEATURE_TYPE_KINDS, RecommenderConfig
from serec.recommender.crossval import evaluate_pipeline
from serec.recommender.crossval_report import format_table, write_stage_report
from serec.recommender.errors import RecommenderError
from serec.recommender.kinds import available_kinds
from serec.recommender.stages import STAGES
from serec.recommender.training import SKIPPED_CSV, train_stage
from serec.runinfo import write_run_json
from serec.selection import SelectionError, selector_checkpoint, selector_record_dir, train_selector

PREDICTOR_STAGE = "predictor"


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--labels_csv", type=Path, required=True, help="labels.csv of the enhancement driver"
    )
    p.add_argument("--output_dir", type=Path, required=True, help="folds, checkpoints, reports")
    p.add_argument(
        "--audio_dir", type=Path, help="noisy files; labels' file column is relative to it"
    )
    p.add_argument(
        "--metadata_csv",
        type=Path,
        help="mixing metadata.csv: speaker (else clean_source) groups the folds; "
        "without it the speaker field of the file name is used",
    )
    p.add_argument(
        "--cekl_features_base_dir",
        type=Path,
        help="features folder of preprocess_features.py (hybrid, logistic, tabular baseline)",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--model_kind",
        choices=available_kinds(),
        default=RecommenderConfig.model_kind,
        help="ast: AST on the filterbank (+ features with --use_hybrid_features); "
        "logistic_regression: on the features only",
    )
    kind.add_argument(
        "--feature_type",
        choices=sorted(FEATURE_TYPE_KINDS),
        help="the thesis' name for the kind: mel_spec = ast, cekl = logistic_regression",
    )
    p.add_argument("--pretrained_models", choices=PRETRAINED_CHOICES,
                   default=RecommenderConfig.pretrained_models)  # fmt: skip
    p.add_argument("--ast_model_dir", type=Path, help="local copy of the pretrained AST (offline)")
    p.add_argument("--ast_size", choices=AST_SIZES, default=RecommenderConfig.ast_size,
                   help="random-init preset for --pretrained_models none")  # fmt: skip
    p.add_argument(
        "--max_audio_seconds",
        type=float,
        help="AST input length for --pretrained_models none (default: 6 tiny, 10.24 "
        "small/base); longer files are cut, shorter ones padded",
    )
    p.add_argument("--use_hybrid_features", action="store_true",
                   help="join the standardised feature vector to the AST embedding")  # fmt: skip


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    cfg = RecommenderConfig
    p.add_argument("--use_weighted_sampler", action="store_true",
                   help="draw classes equally often (class-balanced weights for the tabular model)")
    p.add_argument("--learning_rate", type=float, default=cfg.learning_rate)
    p.add_argument("--weight_decay", type=float, default=cfg.weight_decay)
    p.add_argument("--batch_size", type=int, default=cfg.batch_size)
    p.add_argument("--num_epochs", type=int, default=cfg.num_epochs)
    p.add_argument("--patience", type=int, default=cfg.patience,
                   help="stop after this many epochs without inner-validation improvement")
    p.add_argument("--label_smoothing", type=float, default=cfg.label_smoothing)
    p.add_argument("--n_folds", type=int, default=cfg.n_folds)
    p.add_argument("--folds", type=int, nargs="+", help="run only these fold numbers (1..n_folds)")
    p.add_argument("--refit", action="store_true",
                   help="also train each stage on every labelled file (checkpoints named with fold "
                   "'all'): the model to deploy in recommendation_driver.py")
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=cfg.device)
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch CPU threads (default 0: half the cores, at least 1; "
                   "oversubscribed OpenMP threads slow training tenfold on a busy machine)")
    p.add_argument("--gatekeeper_class", help="the gatekeeper's label (default: most frequent)")
    for stage in STAGES:
        p.add_argument(f"--{stage}_model_path", default=getattr(cfg, f"{stage}_model_path"),
                                      help=f"the {stage} checkpoint of each fold ({{fold}} is filled in)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--training_stage", required=True, choices=[*STAGES, "evaluate_pipeline", PREDICTOR_STAGE])
    p.add_argument("--predictor_learner", choices=list(LEARNERS), default=DEFAULT_LEARNER,
                   help="--training_stage predictor's learner: lightgbm on the features, or ast (the AST "
                   "joined with the features, a regression head; reads --audio_dir)")
    _add_data_flags(p)
    _add_model_flags(p)
    _add_training_flags(p)
    return p.parse_args(argv)


def _train_predictor(args: argparse.Namespace, cfg: RecommenderConfig) -> int:
    """The quality selector's stage: python -m serec.selection train with this command's flags
    (`cfg` sizes and trains the ast learner's networks)."""
    if args.metadata_csv is None or args.cekl_features_base_dir is None:
        raise SelectionError("--training_stage predictor needs --metadata_csv (speaker, noise_source) and "
                             "--cekl_features_base_dir (e.g. preprocess_features.py --feature_set dnsmos_embed)")
    path = args.output_dir / selector_checkpoint(args.predictor_learner)
    selector = train_selector(args.labels_csv, args.cekl_features_base_dir, args.metadata_csv, path,
                              n_folds=args.n_folds, seed=args.seed, learner=args.predictor_learner,
                              audio_dir=args.audio_dir, config=cfg)
    write_run_json(args.output_dir / selector_record_dir(args.predictor_learner), args,
                   selector_training=selector["training"])
    training = selector["training"]
    print(f"selector: {path} ({selector['label_metric']} gain of {len(selector['models'])} models; best single "
          f"{selector['best_single']}; safe margin {selector['margin']:g}; learner {training['learner']}, "
          f"{training['seconds']:.1f} s; {training['files']} files, "
          f"{training['held_out_files']} held out by the {training['folds']} speaker- and noise-disjoint folds)")
    return ExitStatus.OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.feature_type:
        args.model_kind = FEATURE_TYPE_KINDS[args.feature_type]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads or max(1, (os.cpu_count() or 2) // 2))
    stage = args.training_stage
    try:
        # Stages share folds.csv and the input cache in OUTPUT_DIR: one run at a time.
        with output_lock(args.output_dir, "recommender"):
            cfg = RecommenderConfig(
                **{f.name: getattr(args, f.name) for f in fields(RecommenderConfig)}
            )
            # The predictor stage's record goes to its learner's folder (predictor, predictor_ast).
            record_dir = cfg.output_dir / (selector_record_dir(args.predictor_learner)
                                           if stage == PREDICTOR_STAGE else stage)
            record_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(record_dir, args)
            if stage == PREDICTOR_STAGE:
                return _train_predictor(args, cfg)
            if stage == "evaluate_pipeline":
                report = evaluate_pipeline(cfg)
                skipped = report.skipped
                print(report.table)
                print(f"reports in {report.out_dir}")
            else:
                result = train_stage(cfg, stage)
                stage_report = write_stage_report(result)
                skipped = result.skipped
                print(format_table(stage_report["summary"], f"{stage}: held-out folds (mean ± std)"))
                print(f"checkpoints: {', '.join(str(f.checkpoint) for f in result.folds)}")
                if result.refit:
                    print(f"refit on every file (deploy this one): {result.refit}")
                print(f"reports in {result.stage_dir}")
    except (RecommenderError, OutputLocked, SelectionError, PredictorError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: finished folds' checkpoints are kept; run the same command to "
              "resume", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    if skipped:
        print(
            f"{len(skipped)} files skipped (unusable audio or features), listed in "
            f"{cfg.output_dir / stage / SKIPPED_CSV}",
            file=sys.stderr,
        )
        return ExitStatus.PARTIAL
    return ExitStatus.OK


if __name__ == "__main__":
    sys.exit(main())

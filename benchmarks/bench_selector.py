"""Cost of the quality selector: training time, and inference time per file on one core.

Inference is what routing a new recording costs before any enhancer runs: the
dnsmos_embed feature vector of the noisy file (CE/KL, DNSMOS of the input, descriptors,
DNSMOS embedding) plus the fold-ensemble prediction, timed file by file in this one
process on real recordings (--noisy_dir), wall and CPU time (time.process_time, the
trustworthy figure when other jobs share the cores).

Training time depends only on the table's shape, so it is timed on a table of the
experiment's size (--files x the feature vector's length, one target per model) with
random values: one LightGBM booster per (fold, model), on folds disjoint in speakers and
noise recordings, as `python -m serec.selection train` fits them.

    python benchmarks/bench_selector.py --noisy_dir runs/zoo/mix100/noisy --timing_files 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from serec.audio import list_audio_files
from serec.features import feature_names, file_features
from serec.parallel import use_single_thread
from serec.predictor import QualityPredictor
from serec.recommender.folds import crossed_folds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noisy_dir", required=True, help="real noisy recordings to time inference on")
    parser.add_argument("--timing_files", type=int, default=20)
    parser.add_argument("--files", type=int, default=800, help="training files (the experiment's train split)")
    parser.add_argument("--models", type=int, default=5, help="enhancers in the zoo")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--speakers", type=int, default=48)
    parser.add_argument("--noises", type=int, default=47)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_single_thread()
    names = feature_names("dnsmos_embed")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.files, len(names)))
    gains = rng.normal(0.5, 0.3, (args.files, args.models))
    run = crossed_folds(rng.choice(["a", "b"], args.files), [f"s{i}" for i in rng.integers(0, args.speakers, args.files)],
                        [f"n{i}" for i in rng.integers(0, args.noises, args.files)], args.folds, seed=0)
    folds = [(run.training_part(k), run.held_out == k) for k in range(1, args.folds + 1)]
    wall, cpu = time.perf_counter(), time.process_time()
    predictor, _ = QualityPredictor.fit(features, gains, folds, [f"m{j}" for j in range(args.models)], names)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"training: {args.files} files x {len(names)} features, {args.models} models, {args.folds} folds "
          f"({args.folds * args.models} boosters of {predictor.num_rounds} rounds): "
          f"{train_wall:.1f} s wall, {train_cpu:.1f} s CPU")

    paths = list_audio_files(args.noisy_dir)[: args.timing_files]
    file_features(paths[0], "dnsmos_embed")  # builds the ONNX sessions outside the timing
    feature_s, predict_s, audio_s, feature_cpu = [], [], 0.0, 0.0
    for path in paths:
        wall, cpu = time.perf_counter(), time.process_time()
        vector = file_features(path, "dnsmos_embed")
        feature_s.append(time.perf_counter() - wall)
        feature_cpu += time.process_time() - cpu
        wall = time.perf_counter()
        predictor.predict(vector[None, :])
        predict_s.append(time.perf_counter() - wall)
        audio_s += vector[names.index("duration_s")]
    n = len(paths)
    print(f"inference on {n} real files ({audio_s / n:.1f} s of audio each on average), one core: "
          f"features {1000 * np.mean(feature_s):.0f} ms wall / {1000 * feature_cpu / n:.0f} ms CPU per file, "
          f"prediction {1000 * np.mean(predict_s):.1f} ms per file")


if __name__ == "__main__":
    main()

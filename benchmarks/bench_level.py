"""Does scoring at a common loudness change the labels? DNSMOS OVR as is vs at one active level.

DNSMOS OVR rewards quieter output, so an enhancer that turns the level down can win a
file it did not improve. This re-scores every (file, system) of an enhancement run with
DNSMOS at a common active-speech level (serec.quality's dnsmos_level_db, the rule the
enhancement driver's --dnsmos_level_db applies) and compares with the scores as they are
in scores.csv: each system's mean OVR and mean output level, the label (OVR-best model)
distribution, how many labels change, and the oracle's headroom over the best single
model. The scores.csv must have been written with the reference behaviour (no level).

    python benchmarks/bench_level.py --enhancement_dir runs/zoo/enh100 --noisy_dir runs/zoo/mix100/noisy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from serec.audio import active_mask, load_audio
from serec.experiment import markdown_table
from serec.labels import NOISY_SYSTEM
from serec.quality import QualityScorer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enhancement_dir", type=Path, required=True, help="enhancement_driver.py's --output_dir")
    parser.add_argument("--noisy_dir", type=Path, required=True, help="its --noisy_dir")
    parser.add_argument("--level_db", type=float, default=-26.0, help="common active-speech level, dBFS")
    parser.add_argument("--max_files", type=int, help="only the first N files (sorted)")
    return parser.parse_args()


def active_level_db(audio: np.ndarray) -> float:
    active = audio[active_mask(audio)].astype(np.float64)
    return float(10 * np.log10(np.mean(active**2) + 1e-20))


def oracle_summary(table: pd.DataFrame, models: list[str]) -> dict[str, object]:
    """Best single model, its mean, the oracle's mean and the label counts of a (file x system) table."""
    wide = table[models]
    means = wide.mean()
    best_single = str(means.idxmax())
    labels = wide.idxmax(axis=1)
    return {
        "best_single": best_single,
        "best_single_ovr": float(means[best_single]),
        "oracle_ovr": float(wide.max(axis=1).mean()),
        "headroom": float(wide.max(axis=1).mean() - means[best_single]),
        "labels": labels,
    }


def main() -> None:
    args = parse_args()
    scores = pd.read_csv(args.enhancement_dir / "scores.csv", dtype={"file": str})
    scores = scores[scores.status == "ok"]
    files = sorted(scores.file.unique())[: args.max_files]
    systems = [s for s in scores.system.unique()]
    models = [s for s in systems if s != NOISY_SYSTEM]
    scorer = QualityScorer(metrics=["dnsmos_ovr"], num_threads=1, dnsmos_level_db=args.level_db)
    rows = []
    for fid in tqdm(files, desc="re-scoring at a common level", unit="file"):
        for system in systems:
            path = args.noisy_dir / fid if system == NOISY_SYSTEM else args.enhancement_dir / "enhanced" / system / fid
            audio = load_audio(path, validate=False)
            rows.append({"file": fid, "system": system, "level_db": active_level_db(audio),
                         "ovr_levelled": scorer.score(audio).values["dnsmos_ovr"]})
    levelled = pd.DataFrame(rows).merge(scores[["file", "system", "dnsmos_ovr"]], on=["file", "system"])
    as_is = levelled.pivot(index="file", columns="system", values="dnsmos_ovr")
    at_level = levelled.pivot(index="file", columns="system", values="ovr_levelled")
    reference, common = oracle_summary(as_is, models), oracle_summary(at_level, models)

    per_system = levelled.groupby("system").agg(
        level_db=("level_db", "mean"), ovr=("dnsmos_ovr", "mean"), ovr_levelled=("ovr_levelled", "mean"))
    wins_ref = reference["labels"].value_counts()
    wins_common = common["labels"].value_counts()
    print(f"{len(files)} files, common level {args.level_db:g} dBFS (active speech)\n")
    print(markdown_table(
        ["system", "mean active level dBFS", "OVR as is", f"OVR at {args.level_db:g} dBFS", "wins as is", "wins at level"],
        [[s, f"{per_system.at[s, 'level_db']:.1f}", f"{per_system.at[s, 'ovr']:.3f}",
          f"{per_system.at[s, 'ovr_levelled']:.3f}",
          "" if s == NOISY_SYSTEM else int(wins_ref.get(s, 0)), "" if s == NOISY_SYSTEM else int(wins_common.get(s, 0))]
         for s in systems]))
    changed = int((reference["labels"] != common["labels"]).sum())
    print()
    print(markdown_table(
        ["scoring", "best single", "its OVR", "oracle OVR", "headroom"],
        [[name, r["best_single"], f"{r['best_single_ovr']:.3f}", f"{r['oracle_ovr']:.3f}", f"+{r['headroom']:.3f}"]
         for name, r in (("as is (reference)", reference), (f"at {args.level_db:g} dBFS", common))]))
    print(f"\nlabels (OVR-best model) that change: {changed} of {len(files)} files ({100 * changed / len(files):.0f}%)")
    print(json.dumps({"files": len(files), "labels_changed": changed,
                      "headroom_as_is": reference["headroom"], "headroom_at_level": common["headroom"]}))


if __name__ == "__main__":
    main()

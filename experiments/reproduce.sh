#!/usr/bin/env bash
# The full protocol on one corpus with fixed seeds; writes results/NAME/tables.md.
#
#   experiments/reproduce.sh NAME CLEAN_DIR NOISE_DIR [flags of python -m serec.experiment]
#
# Audio, models and every step's outputs go to runs/NAME (not committed); run the same
# command again to resume after an interruption. `python -m serec.experiment --help` lists
# the flags (--num_mixtures 1000, --n_folds 5, --models, --seed, ...).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
name=$1 clean=$2 noise=$3
shift 3
cd "$(dirname "$0")/.."
make --no-print-directory install
exec .venv/bin/python -m serec.experiment --name "$name" --clean_dir "$clean" --noise_dir "$noise" "$@"

#!/usr/bin/env bash
# The C runtime on every test image (issue: a C runtime). For hfq W8A8, W6A6 and W4A8 with power-of-two scales:
# quantize (into WORK, once), then `hybridquant eval --runtime c`: export, compile, run the test split through
# the C program; top-1, agreement with the simulation and the Python integer executor, the largest logit
# difference in output codes, images/s. Writes benchmarks/results/runtime/eval_c_<model>_hfq_W<w>A<a>_pot.json.
#   bash benchmarks/c_check.sh [MODEL] [DATA]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model=${1:-mobilevit_xxs.cifar10} data=${2:-../shared/data/cifar10}
work=${WORK:-benchmarks/results/runtime/$model}
for bits in 8/8 6/6 4/8; do
    w=${bits%/*} a=${bits#*/}
    cell="$work/hfq_W${w}A${a}_pot"
    [ -f "$cell/model.hq" ] || hybridquant quantize --model "$model" --data "$data" --method hfq --wbits "$w" \
        --abits "$a" --scales pot --out-dir "$cell"
    hybridquant eval --qmodel "$cell/model.hq" --runtime c --data "$data" \
        --out "benchmarks/results/runtime/eval_c_${model}_hfq_W${w}A${a}_pot.json"
done

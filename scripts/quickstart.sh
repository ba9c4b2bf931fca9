#!/usr/bin/env bash
# One command on a fresh machine: set up a virtual environment and quantize the
# bundled MobileViT-XXS (CIFAR-10) with hfq at W8A8, power-of-two scales.
#   bash scripts/quickstart.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:-../shared/data/cifar10}
OUT=${2:-runs/quickstart}
if [ ! -x .venv/bin/hybridquant ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet -e '.[dev]'
fi
.venv/bin/hybridquant quantize --model mobilevit_xxs.cifar10 --data "$DATA" \
    --method hfq --wbits 8 --abits 8 --scales pot --calib 512 --out-dir "$OUT"
echo "report: $OUT/report.md   quantized model: $OUT/model.hq"

#!/usr/bin/env bash
# Integer program vs simulation vs ONNX on the bundled model (issue: integer-only executor).
# For hfq W8A8 and W6A6 with power-of-two scales: quantize, run the integer program on every test image
# (agreement with the simulation, logit difference in LSB), export QDQ ONNX and evaluate it with
# onnxruntime. Writes benchmarks/results/integer_<model>.json (with the environment) and .md.
#   bash benchmarks/integer_check.sh [MODEL] [DATA]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${1:-mobilevit_xxs.cifar10}
DATA=${2:-../shared/data/cifar10}
WORK=${WORK:-benchmarks/results/integer/$MODEL}
mkdir -p "$WORK"
for setting in "8 8" "6 6"; do
    set -- $setting
    d="$WORK/hfq_W$1A$2_pot"
    [ -f "$d/report.json" ] || hybridquant quantize --model "$MODEL" --data "$DATA" --method hfq --wbits "$1" --abits "$2" \
        --scales pot --out-dir "$d"
    [ -f "$d/integer.json" ] || hybridquant eval --qmodel "$d/model.hq" --integer --data "$DATA" --out "$d/integer.json"
    [ -f "$d/model.onnx" ] || hybridquant export --qmodel "$d/model.hq" --format onnx --out "$d/model.onnx"
    [ -f "$d/onnx.json" ] || hybridquant eval --onnx "$d/model.onnx" --qmodel "$d/model.hq" --data "$DATA" --out "$d/onnx.json"
done
python - "$WORK" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
from hybridquant._io import write_json, write_text
from hybridquant.report import environment, markdown_table
work, model = Path(sys.argv[1]), sys.argv[2]
rows = []
for d in sorted(p for p in work.iterdir() if p.is_dir()):
    rep, integ, onnx = (json.loads((d / f).read_text()) for f in ("report.json", "integer.json", "onnx.json"))
    rows.append({"cell": d.name, "sim_top1": rep["quant_top1"], "fp32_top1": rep["fp32_top1"],
                 "integer_top1": integ["top1"], "agreement_sim": integ["agreement_sim"],
                 "max_logit_diff_lsb": integ["max_logit_diff_lsb"], "integer_seconds": integ["seconds"],
                 "onnx_top1": onnx["top1"], "onnx_agreement_sim": onnx.get("agreement_sim"),
                 "onnx_minus_sim_pp": round(100 * (onnx["top1"] - rep["quant_top1"]), 2),
                 "images": integ["images"], "integer": rep.get("integer", {})})
out = Path("benchmarks/results") / f"integer_{model}"  # model names contain dots: no with_suffix
write_json(out.parent / f"{out.name}.json", {"model": model, "environment": environment(), "rows": rows})
cols = ["cell", "fp32_top1", "sim_top1", "integer_top1", "agreement_sim", "max_logit_diff_lsb", "onnx_top1",
        "onnx_minus_sim_pp", "integer_seconds", "images"]
write_text(out.parent / f"{out.name}.md", f"# integer program vs simulation vs ONNX: {model}\n\n" + markdown_table(rows, cols) + "\n")
print(markdown_table(rows, cols))
PY

"""Reproduce the README's headline result: hfq W8A8 (power-of-two) on the bundled ``mobilevit_xxs.cifar10``.

The committed run is the ``hfq_W8A8_pot`` row of ``benchmarks/results/core_mobilevit_xxs.cifar10.json``
(all 10,000 test images, 512 calibration images). Its config, calibration size and interval are read from
that file. The job is the suite's own (``benchmarks/run.py``: :func:`~hybridquant.pipeline.prepare` and
:func:`~hybridquant.pipeline.run_config`, seed 0), evaluated on a fixed, class-balanced 2,000-image subset
of the test split (the first 200 images of each class in file order). It passes when the subset's drop lies
inside the committed run's 95 % interval of the drop.

Needs CIFAR-10 as an ImageFolder at ``../shared/data/cifar10`` (relative to the repository root, whatever
the working directory); skipped when that folder is absent. Marked ``cifar10``: ``pytest -m cifar10`` runs
it alone, ``-m "not cifar10"`` leaves it out. The test runs torch on two threads and restores the caller's
setting afterwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
RESULT = REPO / "benchmarks" / "results" / "core_mobilevit_xxs.cifar10.json"
MODEL = "mobilevit_xxs.cifar10"
CELL = "hfq_W8A8_pot"
SUBSET = 2000
THREADS = 2
SEED = 0  # benchmarks/run.py's default

pytestmark = [
    pytest.mark.cifar10,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"CIFAR-10 ImageFolder not found at {DATA}"),
]


def committed_row() -> dict:
    rows = [r for r in json.loads(RESULT.read_text())["rows"] if r["cell"] == CELL]
    assert len(rows) == 1, f"{RESULT.name} has {len(rows)} rows '{CELL}'"
    return rows[0]


def committed_interval(row: dict) -> tuple[tuple[float, float], str]:
    """The committed run's 95 % interval of the drop (points), and where it came from.

    ``drop_ci95_pp`` when the row has it. Rows written before ``quantize`` reported the interval lack it;
    then it is rebuilt from the row with :func:`hybridquant.evaluate.paired_drop`'s formula: from
    ``fp32_only_correct`` / ``quant_only_correct`` when present, else at its widest, taking every image on
    which the two models' predictions differ (``1 - agreement_fp32`` of them) as one that only one of them
    gets right (more than the true count, so a wider interval than the exact one).
    """
    from hybridquant.evaluate import Z_95

    if row.get("drop_ci95_pp") is not None:
        lo, hi = row["drop_ci95_pp"]
        return (float(lo), float(hi)), "drop_ci95_pp"
    n = int(row["eval_images"])
    if row.get("fp32_only_correct") is not None and row.get("quant_only_correct") is not None:
        b, c, how = int(row["fp32_only_correct"]), int(row["quant_only_correct"]), "fp32_only/quant_only_correct"
        diff, carriers = b - c, b + c
    else:
        diff = round(row["drop_pp"] * n / 100)
        carriers = round((1.0 - row["agreement_fp32"]) * n)
        how = f"widest for agreement_fp32 ({carriers} disagreeing images)"
    drop = 100.0 * diff / n
    se = 100.0 * math.sqrt(max(carriers - diff * diff / n, 0.0)) / n
    return (drop - Z_95 * se, drop + Z_95 * se), how


@pytest.fixture(scope="module")
def reproduced():
    """(committed row, report of the same job on the subset): one hfq W8A8 quantization for the module."""
    from hybridquant.config import QuantConfig
    from hybridquant.data import DataOverrides
    from hybridquant.pipeline import DataSpec, prepare, run_config

    row = committed_row()
    config = QuantConfig.from_dict(row["config"])
    assert (config.method, config.wbits, config.abits, config.scales) == ("hfq", 8, 8, "pot")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(SEED)
        data = DataSpec(DATA, DataOverrides(), limit=SUBSET, calib=int(row["calib_images"]), batch_size=200,
                        workers=0, seed=SEED)
        prep = prepare(MODEL, None, False, data, progress=False)
        report, _, _ = run_config(prep, config, data.batch_size, progress=False)
    finally:
        torch.set_num_threads(threads)
    return row, report


def test_hfq_w8a8_drop_on_a_balanced_subset_is_inside_the_committed_interval(reproduced):
    row, report = reproduced
    assert report["eval_images"] == SUBSET and report["calib_images"] == row["calib_images"]
    assert report["all_scales_pot"] and report["integer"]["integer_only"]
    (lo, hi), how = committed_interval(row)
    drop = report["drop_pp"]
    # shown with -rP (or on failure): the numbers and where the time went
    print(f"drop {drop:.2f} pp (committed interval [{lo:.3f}, {hi:.3f}], {how}); "
          f"seconds {report['seconds']} {report['seconds_breakdown']}")
    assert lo <= drop <= hi, (
        f"hfq W8A8 drop on the {SUBSET}-image subset is {drop:.2f} pp (FP32 {100 * report['fp32_top1']:.2f} %, "
        f"hfq {100 * report['quant_top1']:.2f} %, agreement {report['agreement_fp32']:.4f}); the committed run "
        f"({row['drop_pp']:.2f} pp on {row['eval_images']} images) has the 95 % interval [{lo:.3f}, {hi:.3f}] "
        f"({how})")

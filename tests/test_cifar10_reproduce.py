"""Reproduce the README's headline result: hfq W8A8 (power-of-two) on the bundled ``mobilevit_xxs.cifar10``.

The committed run is the ``hfq_W8A8_pot`` row of ``benchmarks/results/core_mobilevit_xxs.cifar10.json``
(all 10,000 test images, 512 calibration images). Its config, calibration size and interval are read from
that file. The job is the suite's own (``benchmarks/run.py``: :func:`~hybridquant.pipeline.prepare` and
:func:`~hybridquant.pipeline.run_config`, seed 0), evaluated on a fixed, class-balanced 2,000-image subset
of the test split (the first 200 images of each class in file order). It passes when the committed drop lies
inside the subset's own 95 % interval of the drop (paired, from the images only one of the two models gets
right): the subset's result is consistent with the committed one. The committed run's interval is the wrong
yardstick for the subset: 2,000 images measure the drop with about √5 times its spread, and the float kernels
of another CPU move a few borderline images (measured: 0.30 pp on an Intel Xeon, where the committed AMD run's
interval ends at 0.26 pp).

Needs CIFAR-10 as an ImageFolder at ``../shared/data/cifar10`` (relative to the repository root, whatever
the working directory); skipped when that folder is absent. Marked ``cifar10``: ``pytest -m cifar10`` runs
it alone, ``-m "not cifar10"`` leaves it out. The test runs torch on two threads and restores the caller's
setting afterwards.
"""

from __future__ import annotations

import json
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


def test_hfq_w8a8_drop_on_a_balanced_subset_is_consistent_with_the_committed_run(reproduced):
    row, report = reproduced
    assert report["eval_images"] == SUBSET and report["calib_images"] == row["calib_images"]
    assert report["all_scales_pot"] and report["integer"]["integer_only"]
    lo, hi = report["drop_ci95_pp"]
    committed = row["drop_pp"]
    # shown with -rP (or on failure): the numbers and where the time went
    print(f"drop {report['drop_pp']:.2f} pp on the subset, 95 % interval [{lo:.3f}, {hi:.3f}]; committed "
          f"{committed:.2f} pp; seconds {report['seconds']} {report['seconds_breakdown']}")
    assert hi - lo < 1.5, f"the subset's interval [{lo:.3f}, {hi:.3f}] is too wide to test anything"
    assert lo <= committed <= hi, (
        f"hfq W8A8 drop on the {SUBSET}-image subset is {report['drop_pp']:.2f} pp (FP32 "
        f"{100 * report['fp32_top1']:.2f} %, hfq {100 * report['quant_top1']:.2f} %, agreement "
        f"{report['agreement_fp32']:.4f}), 95 % interval [{lo:.3f}, {hi:.3f}]; the committed run's drop "
        f"({committed:.2f} pp on {row['eval_images']} images) lies outside it")

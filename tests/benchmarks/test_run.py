"""Smoke test of the benchmark runner on a tiny model and two settings (not a benchmark)."""

from __future__ import annotations

import json

from tests.benchmarks import load_script


def _load_runner():
    return load_script("run")


def test_core_suite_runs_and_resumes(tmp_path, q_ckpt_path, data_dir):
    runner = _load_runner()
    args = ["--suite", "core", "--model", "mobilevit_xxs", "--checkpoint", str(q_ckpt_path), "--data", str(data_dir),
            "--calib", "6", "--workers", "0", "--batch-size", "6", "--only", "minmax_W8A8,minmax_W16", "--out", str(tmp_path),
            "--label", "ref"]
    assert runner.main(args) == 0
    summary = json.loads((tmp_path / "core_ref.json").read_text())
    cells = {r["cell"] for r in summary["rows"]}
    assert cells == {"minmax_W8A8_pot", "minmax_W16A16_float"}
    assert summary["environment"]["torch"] and summary["environment"]["cpu_cores"]
    assert summary["environment"]["cpu_capability"]
    assert "| minmax_W8A8_pot |" in (tmp_path / "core_ref.md").read_text()
    # resumable: a second run reuses the cell files
    cell = tmp_path / "core" / "ref" / "minmax_W8A8_pot.json"
    stamp = cell.stat().st_mtime_ns
    assert runner.main(args) == 0
    assert cell.stat().st_mtime_ns == stamp


def test_suites_cover_the_documented_matrix():
    runner = _load_runner()
    baselines = dict(runner.cells("baselines"))
    assert len(baselines) == len(runner.BASELINE_METHODS) * 3 * 2  # W8A8, W6A6, W4A8 x float, PoT
    assert {c.method for c in baselines.values()} == set(runner.BASELINE_METHODS)
    ablation = runner.cells("ablation")
    assert len(ablation) == len(runner.ABLATIONS) * 3
    core = dict(runner.cells("core"))
    # the three settings, plus one side at a time of W6A6 and of W8A8
    assert {(c.wbits, c.abits) for c in core.values() if c.method == "hfq"} == {
        (8, 8), (6, 6), (4, 8), (8, 6), (6, 8), (16, 8), (8, 16)}
    limits = dict(runner.cells("limits"))
    assert len(limits) == len(runner.FLOAT_GROUPS)
    assert {c.float_ops for c in limits.values()} == set(runner.FLOAT_GROUPS.values())


def test_cells_take_each_methods_defaults_from_the_config():
    """No PoT rounding is chosen in the runner: each method's comes from QuantConfig (hfq: objective)."""
    runner = _load_runner()
    for suite in ("baselines", "ablation", "core", "limits"):
        for cid, cfg in runner.cells(suite):
            want = "objective" if cfg.method == "hfq" else "round"
            if not cid.startswith("PoT-"):  # the ablation rows that switch the search off
                assert cfg.pot_rounding == want, cid
    core = dict(runner.cells("core"))
    assert core["minmax_W16A16_float"].method == "minmax" and core["minmax_W16A16_float"].scales == "float"

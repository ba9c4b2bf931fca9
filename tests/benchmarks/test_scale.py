"""The scale benchmark: its summary from hand-made cells, its resume logic, and one tiny real cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import load_script
from tests.conftest import write_images


@pytest.fixture(scope="module")
def scale():
    return load_script("scale")


def _cell(model: str, calib: int, wall: float, rss: float) -> dict:
    phases = {p: {"seconds": 1.0, "peak_rss_mb": rss, "depth": 2} for p in ("observe", "exponent search")}
    return {"model": model, "calib": calib, "img_size": 256, "limit": 200, "batch_size": 32, "threads": 2,
            "reconstruction_iters": None, "random_weights": True, "wall_seconds": wall, "max_rss_mb": rss,
            "seconds": wall - 5, "quantize_seconds": wall - 10, "peak_rss_mb": rss, "phases": phases,
            "workspace": {"budget_mb": 4000.0, "peak_resident_mb": 10.0, "spilled_mb": 0.0},
            "calib_images": calib, "eval_images": 200, "fp32_top1": 0.1, "quant_top1": 0.1, "config": {},
            "command": "python -m hybridquant quantize ...", "environment": {"torch": "x", "cpu_cores": 2}}


def _eval(model: str, procs: int, rate: float) -> dict:
    return {"model": model, "procs": procs, "threads_per_process": 2 // procs, "img_size": 256, "batch_size": 32,
            "random_weights": True, "wall_seconds": 20.0, "max_rss_mb": 900.0, "images": 512, "seconds": 10.0,
            "images_per_s": rate, "top1": 0.1, "command": "python -m hybridquant eval ...",
            "environment": {"torch": "x"}}


def _write_cells(root: Path) -> None:
    cells = root / "scale" / "cells"
    cells.mkdir(parents=True)
    rows = [_cell("mobilevit_xxs", c, 10 + 0.5 * c, 1000 + c) for c in (64, 128, 256)]
    rows.append(_cell("mobilevit_s", 64, 40.0, 2000.0))
    rows.append({**_cell("mobilevit_s", 128, 3.0, 0.0), "error": "Traceback ...\nMemoryError: out of memory\n"})
    for r in rows:
        for k in ("seconds", "phases", "peak_rss_mb", "workspace") if "error" in r else ():
            r.pop(k)
        (cells / f"{r['model']}_c{r['calib']}.json").write_text(json.dumps(r))
    for procs, rate in ((1, 40.0), (2, 60.0)):
        (cells / f"eval_mobilevit_xxs_p{procs}.json").write_text(json.dumps(_eval("mobilevit_xxs", procs, rate)))


def test_summary_fits_time_and_reports_ratios(scale, tmp_path):
    _write_cells(tmp_path)
    assert scale.main(["--summary-only", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "scale.json").read_text())
    assert [(r["model"], r["calib"]) for r in summary["cells"]] == [
        ("mobilevit_xxs", 64), ("mobilevit_xxs", 128), ("mobilevit_xxs", 256), ("mobilevit_s", 64),
        ("mobilevit_s", 128)]  # grid order, then calibration size
    xxs, s = summary["models"]["mobilevit_xxs"], summary["models"]["mobilevit_s"]
    assert xxs["fit"] == {"seconds_per_image": 0.5, "intercept_s": 10.0, "cells": 3}
    assert xxs["rss_ratio"] == round(1256 / 1064, 3) and xxs["time_ratio"] == round(138 / 42, 3)
    assert xxs["projected_s"] == 266.0  # 512 is missing: 10 + 0.5 * 512
    assert xxs["eval_images_per_s"] == {"1": 40.0, "2": 60.0} and xxs["eval_speedup"] == 1.5
    # one measured cell (the other failed): no line, no ratio, no projection
    assert s["fit"] is None and "rss_ratio" not in s and "projected_s" not in s
    assert summary["note"] == scale.NOTE and summary["environment"]["torch"]

    md = (tmp_path / "scale.md").read_text()
    assert "random weights" in md and "| 256 | 1.0 s | — | 1.0 s | — |" in md
    assert "128 calibration images failed: MemoryError: out of memory" in md
    assert "wall time ≈ 10 s + 0.50 s per calibration image (least squares over 3 cells)" in md
    assert "512 calibration images not measured; the line projects 266 s" in md
    assert "| mobilevit_xxs | 40.00 | 60.00 | 1.50 |" in md
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    block = load_script("readme_tables").render(tmp_path, "scale")
    assert "| mobilevit_xxs | 256 | 133 | 138 | 1256 | 4000 | 0 |" in block
    assert "| mobilevit_s | 128 | failed | 3 | – | – | – |" in block
    assert "| mobilevit_xxs | 0.50 | 10 | 1.18 | 3.29 | 266 | 40.0 | 60.0 | 1.50 |" in block
    assert "random weights" in block


def test_no_cells_no_summary(scale, tmp_path):
    assert scale.main(["--summary-only", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "scale.json").exists()
    assert "not measured yet" in load_script("readme_tables").render(tmp_path, "scale")


def _fake_runner(scale, calls: list, fail: set[int] = frozenset()):
    """A ``run_child`` that writes what the real child would (report.json or the eval --out) and counts calls."""
    def run(cmd, threads):
        calls.append((cmd, threads))
        if "quantize" in cmd:
            calib = int(cmd[cmd.index("--calib") + 1])
            if calib in fail:
                return scale.Child(1, 1.0, 100.0, "loading...\nHybridQuantError: no memory\n")
            report = {k: 1 for k in scale.REPORT_KEYS} | {"phases": {}, "workspace": {"spilled_mb": 0.0},
                                                           "peak_rss_mb": 500.0 + calib, "seconds": 5.0}
            (Path(cmd[cmd.index("--out-dir") + 1]) / "report.json").write_text(json.dumps(report))
        else:
            out = {"images": 16, "seconds": 1.0, "images_per_s": 16.0, "top1": 0.1}
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(out))
        return scale.Child(0, 10.0 + len(calls), 600.0, "")

    return run


def test_resume_skips_cells_on_disk_and_a_failure_does_not_stop_the_suite(scale, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(scale, "run_child", _fake_runner(scale, calls, fail={4}))
    monkeypatch.setattr(scale, "checkpoint", lambda cache, model: tmp_path / f"{model}.pt")
    args = ["--models", "mobilevit_xxs", "--calib", "4,8", "--eval-images", "16", "--reconstruction-iters", "3",
            "--out", str(tmp_path)]
    assert scale.main(args) == 0
    assert len(calls) == 4  # two quantize cells, eval with 1 and with 2 processes
    cells = tmp_path / "scale" / "cells"
    failed = json.loads((cells / "mobilevit_xxs_c4.json").read_text())
    assert "HybridQuantError: no memory" in failed["error"] and "phases" not in failed
    ok = json.loads((cells / "mobilevit_xxs_c8.json").read_text())
    assert ok["peak_rss_mb"] == 508.0 and ok["reconstruction_iters"] == 3 and ok["threads"] == 2
    assert "--reconstruction-iters 3" in ok["command"] and ok["command"].startswith("OMP_NUM_THREADS=2 python -m")
    assert "--out-dir OUT" in ok["command"]  # the temporary folder is not recorded
    (one, t1), (two, t2) = calls[2:]
    assert "torch.distributed.run" not in one and t1 == 2
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"] and t2 == 1
    assert json.loads((cells / "eval_mobilevit_xxs_p2.json").read_text())["images_per_s"] == 16.0

    stamp = (cells / "mobilevit_xxs_c8.json").stat().st_mtime_ns
    assert scale.main(args) == 0
    assert len(calls) == 4  # every cell on disk (the failed one too): nothing reruns
    assert (cells / "mobilevit_xxs_c8.json").stat().st_mtime_ns == stamp
    assert scale.main([*args, "--force", "--eval-images", "0"]) == 0
    assert len(calls) == 6
    assert json.loads((tmp_path / "scale.json").read_text())["models"]["mobilevit_xxs"]["fit"] is None


def test_models_outside_the_grid_need_calib(scale, tmp_path):
    with pytest.raises(SystemExit):
        scale.main(["--models", "resnet18", "--out", str(tmp_path)])


def test_one_real_cell(scale, tmp_path):
    """One real quantize child, tiny: the cell carries the report's phases and the child's own RSS."""
    data_dir = tmp_path / "data"
    for k, split in enumerate(("train", "test")):  # the random-weight checkpoints have 10 classes
        write_images(data_dir / split, {f"c{i}": 1 for i in range(scale.NUM_CLASSES)}, seed=k)
    args = ["--models", "mobilevit_xxs", "--calib", "4", "--img-size", "64", "--limit", "10", "--batch-size", "5",
            "--threads", "1", "--workers", "0", "--reconstruction-iters", "1", "--eval-images", "0",
            "--data", str(data_dir), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    assert scale.main(args) == 0
    row = json.loads((tmp_path / "scale" / "cells" / "mobilevit_xxs_c4.json").read_text())
    assert "error" not in row, row.get("error")
    assert {"observe", "exponent search", "reconstruction"} <= set(row["phases"])
    assert row["calib_images"] == 4 and row["config"]["options"]["reconstruction_iters"] == 1
    assert row["max_rss_mb"] > 100 and row["peak_rss_mb"] > 100 and row["wall_seconds"] >= row["seconds"]
    assert (tmp_path / "cache" / "mobilevit_xxs.pt").exists()


def test_ratios_compare_cells_of_one_memory_budget_only(scale):
    lo, hi = _cell("mobilevit_xxs", 64, 42, 1064), _cell("mobilevit_xxs", 256, 138, 1256)
    assert scale.model_summary([lo, hi], [])["rss_ratio"] == round(1256 / 1064, 3)
    hi["workspace"] = {**hi["workspace"], "budget_mb": 251.0}
    assert "rss_ratio" not in scale.model_summary([lo, hi], []) and "time_ratio" not in scale.model_summary([lo, hi], [])

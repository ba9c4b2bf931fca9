"""The heap benchmark's table: one row per set-up, ratios of the larger run to the smaller, times against glibc's."""

from __future__ import annotations

from tests.benchmarks import load_script


def test_markdown_rows_ratios_and_times():
    heap = load_script("heap")
    setups = [{"setup": s, "peak_rss_mb": {"16": 1000.0, "64": rss}, "seconds": {"16": 10.0, "64": sec},
               "rss_ratio": round(rss / 1000.0, 3)} for s, rss, sec in
              (("glibc", 1400.0, 80.0), ("trim", 1300.0, 84.0), ("mmap", 1100.0, 120.0), ("mmap+thp", 1100.0, 88.0))]
    md = heap.markdown({"model": "mobilevit_xxs", "img_size": 128, "calib": [16, 64], "budget_mb": 100,
                        "reconstruction_iters": 30, "setups": setups})
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`glibc`", "`trim`", "`mmap`", "`mmap+thp`"]
    assert "| 1.40 |" in rows[0] and "| 1.00× |" in rows[0] and "| 1.50× |" in rows[2] and "| 1.10× |" in rows[3]

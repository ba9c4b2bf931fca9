"""The README's result tables are rendered from the benchmark JSON, never typed by hand."""

from __future__ import annotations

import json

from tests.benchmarks import load_script


def _load():
    return load_script("readme_tables")


def _row(cell, method, w, a, scales, top1, fp32=0.8):
    return {"cell": cell, "method": method, "wbits": w, "abits": a, "scales": scales, "fp32_top1": fp32,
            "quant_top1": top1, "drop_pp": round(100 * (fp32 - top1), 4), "agreement_fp32": 0.9,
            "param_increase_pct": 0.0, "eval_images": 100, "calib_images": 8, "quantize_seconds": 1.0,
            "environment": {"torch": "x", "cpu_cores": 2}}


def test_committed_readme_matches_committed_results():
    assert _load().main(["--check"]) == 0


def test_tables_follow_the_json(tmp_path):
    mod = _load()
    results = tmp_path / "results"
    results.mkdir()
    rows = [_row("minmax_W8A8_pot", "minmax", 8, 8, "pot", 0.5), _row("hfq_W8A8_pot", "hfq", 8, 8, "pot", 0.75)]
    (results / "baselines_m.json").write_text(json.dumps({"rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:baselines.m -->\nold\n<!-- /table:baselines.m -->\nend\n")
    args = ["--results", str(results), "--readme", str(readme), "--models", "m"]
    assert mod.main(args + ["--check"]) == 1  # "old" is not what the JSON says
    assert mod.main(args) == 0
    text = readme.read_text()
    # only the measured setting gets columns (float and PoT)
    assert "| hfq | – | 75.00 (-5.00) |" in text and "W6A6" not in text and "old" not in text
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert mod.main(args + ["--check"]) == 0
    assert (results / "accuracy_m.png").stat().st_size > 0
    rows[1]["quant_top1"] = 0.7  # a new measurement makes the README stale
    (results / "baselines_m.json").write_text(json.dumps({"rows": rows}))
    assert mod.main(args + ["--check"]) == 1


def test_integer_table_follows_the_json(tmp_path):
    mod = _load()
    results = tmp_path / "results"
    results.mkdir()
    assert "not measured yet" in mod.integer_table(results, "m")
    row = {"cell": "hfq_W8A8_pot", "sim_top1": 0.85, "integer_top1": 0.8501, "agreement_sim": 1.0,
           "max_logit_diff_lsb": 0.0, "integer_seconds": 200.4, "onnx_top1": 0.849, "onnx_minus_sim_pp": -0.1,
           "images": 100}
    (results / "integer_m.json").write_text(json.dumps({"rows": [row], "environment": {"torch": "x"}}))
    text = mod.integer_table(results, "m")
    assert "| hfq_W8A8_pot | 85.00 | 85.01 | 1.0000 | 0 | 200 | 84.90 | -0.10 |" in text
    assert "100 test images" in text and "torch x" in text


def test_peers_table_spells_out_what_a_tool_cannot_do(tmp_path):
    mod = _load()
    ok = {**_row("mct_W8A8_pot", None, 8, 8, "pot", 0.79), "tool": "mct", "version": "2.6", "quantize_seconds": 12.4}
    no = {**_row("nncf_W8A8_pot", None, 8, 8, "pot", 0.0), "tool": "nncf", "version": "3.4", "quant_top1": None,
          "drop_pp": None, "error": "unsupported: NNCF has no power-of-two scale option"}
    text = mod.peers_table([ok, no])
    assert "| mct 2.6 | 79.00 (-1.00) | – | 12 |" in text  # float not measured: a dash
    assert "| nncf 3.4 | n/a [1] | – | – |" in text
    assert "[1] unsupported: NNCF has no power-of-two scale option" in text
    # a plot has one panel for the engine's methods and one for the tools
    results = tmp_path / "results"
    results.mkdir()
    hfq = _row("hfq_W8A8_pot", "hfq", 8, 8, "pot", 0.8)
    (results / "baselines_m.json").write_text(json.dumps({"rows": [hfq]}))
    (results / "peers_m.json").write_text(json.dumps({"rows": [ok, no]}))
    methods, tools, fp32 = mod._series(results, "m")
    assert methods == {"hfq": [(0, 80.0)]} and tools == {"mct (PoT)": [(0, 79.0)]} and fp32 == 0.8
    assert mod.plot(results, "m", results / "p.png")


def test_limits_table_measures_each_group_against_the_fully_quantized_run():
    mod = _load()
    assert "not measured yet" in mod.limits_table([])
    full = {**_row("hfq_W6A6_float-all-quantized", "hfq", 6, 6, "pot", 0.79), "config": {"float_ops": []}}
    adds = {**_row("hfq_W6A6_float-residual-adds", "hfq", 6, 6, "pot", 0.795), "agreement_fp32": 0.925,
            "config": {"float_ops": ["*add*"]}}
    text = mod.limits_table([full, adds])
    assert "| all quantized | none | 79.00 | 1.00 | 0.9000 | +0.00 |" in text
    assert "| residual adds | `*add*` | 79.50 | 0.50 | 0.9250 | +2.50 |" in text

"""The README's result tables and quoted figures are rendered from the benchmark JSON, never typed by hand."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import BENCHMARKS, load_script

README = BENCHMARKS.parent / "README.md"


def _load():
    return load_script("readme_tables")


def _row(cell, method, w, a, scales, top1, fp32=0.8):
    return {"cell": cell, "method": method, "wbits": w, "abits": a, "scales": scales, "fp32_top1": fp32,
            "quant_top1": top1, "drop_pp": round(100 * (fp32 - top1), 4), "agreement_fp32": 0.9,
            "param_increase_pct": 0.0, "eval_images": 100, "calib_images": 8, "quantize_seconds": 1.0,
            "environment": {"torch": "x", "cpu_cores": 2}}


def test_committed_readme_matches_committed_results(capsys):
    assert _load().main(["--check"]) == 0, capsys.readouterr().err


def _check_copy(tmp_path, text):
    """``--check`` of ``text`` as the README, against the committed results."""
    readme = tmp_path / "README.md"
    readme.write_text(text)
    return _load().main(["--readme", str(readme), "--check"])


@pytest.mark.parametrize("block, old, new", [
    # a table cell, and a figure in a generated sentence
    ("table:core.mobilevit_xxs.cifar10", "| minmax_W16A16_float | 85.08 | 0.05 |", "| minmax_W16A16_float | 85.08 | 0.04 |"),
    ("text:limits-reading.mobilevit_xxs.cifar10+mobilevit_xxs.reference_6ep", "The largest is +0.55 points",
     "The largest is +0.65 points"),
])
def test_a_hand_edited_number_inside_a_block_fails_the_check(tmp_path, capsys, block, old, new):
    text = README.read_text()
    start = text.index(f"<!-- {block} -->")
    end = text.index(f"<!-- /{block} -->")
    assert text.count(old) == 1 and start < text.index(old) < end
    assert _check_copy(tmp_path, text.replace(old, new)) == 1
    err = capsys.readouterr().err
    assert f"block {block.split(':', 1)[1]} differs" in err and err.count("differs") == 1


@pytest.mark.parametrize("figure", ["84.40 %", "0.73 pp", "0.36 points", "agreement 0.9536", "took 225 s",
                                    "in 2 minutes", "12 MB", "31 dB", "44 images/s", "25 LSBs", "3× faster",
                                    "3 times slower", "13 of 10,000 images", "a drop of +1", "−0.19"])
def test_a_measured_figure_typed_into_prose_fails_the_check(tmp_path, capsys, figure):
    text = README.read_text()
    anchor = "## Bundled models\n"
    line = text[:text.index(anchor)].count("\n") + 2
    assert _check_copy(tmp_path, text.replace(anchor, f"{anchor}On this model hfq gives {figure} here.\n")) == 1
    err = capsys.readouterr().err
    assert f"README.md:{line}: measured figure outside a generated block" in err
    assert err.count("measured figure outside") == 1


def test_configuration_values_and_named_allowances_pass(tmp_path, capsys):
    mod = _load()
    ok = ("W8A8 and W6A6, `--calib 512`, `--seed 1`, 256×256 images, `torch==2.14.1`, Python ≥ 3.10, all 10,000 "
          "test images, 30 epochs, opset 21, int32, mobilevitv2_050, 2^b − 1 thresholds, 1e-5, CIFAR-10, top-1.\n"
          "The target is a drop of at most 0.6 points. <!-- not-measured: 0.6 points -->\n"
          "```bash\nhybridquant quantize --wbits 6 --abits 6 --calib 512 --reconstruction-iters 300\n```\n")
    assert mod.measured_figures(ok) == []
    # the allowance names one figure on its own line, nothing else
    assert mod.measured_figures("at most 0.6 points, reached 0.61 points <!-- not-measured: 0.6 points -->\n") == [
        "line 1: measured figure outside a generated block: '0.61 points'"]
    assert mod.measured_figures("at most 0.6 points <!-- not-measured: 0.7 points -->\n") == [
        "line 1: stale allowance: '0.7 points' is not on this line",
        "line 1: measured figure outside a generated block: '0.6 points'"]
    assert mod.measured_figures("at most 0.6 points\n<!-- not-measured: 0.6 points -->\n")[0].startswith(
        "line 2: stale allowance")
    # a figure inside a generated block is the block's business, not the prose scan's
    assert mod.measured_figures("<!-- text:x -->\n84.40 %\n<!-- /text:x -->\n") == []
    assert mod.measured_figures("<!-- text:x -->\n84.40 %\n") == [
        "line 1: <!-- text:x --> has no matching start or end marker",
        "line 2: measured figure outside a generated block: '84.40 %'"]


def test_unknown_block_kinds_and_wrong_labels_fail_the_check(tmp_path, capsys):
    text = README.read_text() + "\n<!-- text:no-such-kind.m -->\n<!-- /text:no-such-kind.m -->\n"
    assert _check_copy(tmp_path, text) == 1
    assert "unknown block kind 'no-such-kind'" in capsys.readouterr().err
    assert _check_copy(tmp_path, README.read_text() + "\n<!-- table:core -->\n<!-- /table:core -->\n") == 1
    assert "'core' takes 1 label(s)" in capsys.readouterr().err


def test_w6a6_draws_follow_the_calibration_seed_files(tmp_path):
    mod = _load()
    results = tmp_path / "results"
    results.mkdir()
    assert "not measured yet" in mod.draws_table(results, "m")
    rows = {0: 0.79, 1: 0.795, 2: 0.80}
    for seed, top1 in rows.items():
        row = {**_row("hfq_W6A6_pot", "hfq", 6, 6, "pot", top1), "agreement_fp32": 0.9 + seed / 100,
               "eval_images": 10000}
        if seed == 2:
            row["drop_ci95_pp"] = [-0.5, 0.5]
        name = "core_m.json" if seed == 0 else f"core_m.calib_seed{seed}.json"
        (results / name).write_text(json.dumps({"rows": [row]}))
    text = mod.draws_table(results, "m")
    # drops 1.00 / 0.50 / 0.00: mean 0.50, sd 0.50; two draws within the 0.6-point target
    assert "| `m` | 80.00 | 0, 1, 2 | 1.00 / 0.50 / 0.00 | 0.50 (0.50) | 2 of 3 | 0.9100 | – / – / −0.50 to 0.50 |" in text
    assert "over it: seed 0 by 40 images" in text and "predate" not in text


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

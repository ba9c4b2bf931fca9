"""`hybridquant quantize` and `eval --qmodel` end to end on a synthetic ImageFolder."""

from __future__ import annotations

import json

import pytest

from hybridquant.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def base_args(q_ckpt_path, data_dir):
    """minmax (the CLI's default is hfq); a later --method in argv wins."""
    return ["--model", "mobilevit_xxs", "--checkpoint", str(q_ckpt_path), "--data", str(data_dir),
            "--workers", "0", "--batch-size", "8", "--method", "minmax"]


def test_quantize_writes_report_and_model_that_reloads_exactly(tmp_path, capsys, base_args, data_dir):
    out_dir = tmp_path / "q"
    code, out, err = _run(capsys, "quantize", *base_args, "--calib", "6", "--scales", "pot", "--out-dir", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    for key in ("method", "wbits", "abits", "scales", "fp32_top1", "quant_top1", "drop_pp", "calib_images",
                "eval_images", "seconds", "param_increase_pct", "layers", "agreement_fp32"):
        assert key in report
    assert report["calib_images"] == 6 and report["eval_images"] == 12
    assert report["all_scales_pot"] is True
    assert report["drop_pp"] == pytest.approx(100 * (report["fp32_top1"] - report["quant_top1"]))
    # the paired counts give the same drop, and its interval holds it
    n = report["eval_images"]
    assert report["drop_pp"] == pytest.approx(100 * (report["fp32_only_correct"] - report["quant_only_correct"]) / n)
    lo, hi = report["drop_ci95_pp"]
    assert lo <= report["drop_pp"] <= hi
    assert json.loads(out)["drop_ci95_pp"] == [lo, hi]
    layer = report["layers"][1]
    assert {"name", "op", "act_bits", "sqnr_db"} <= set(layer)
    # per-phase time and peak memory (issue 23), the older time keys derived from them
    from hybridquant.report import PIPELINE_PHASES

    assert list(report["phases"])[:3] == ["load", "capture", "eval fp32"]
    assert set(PIPELINE_PHASES) <= set(report["phases"])
    assert all(fig["peak_rss_mb"] > 0 for fig in report["phases"].values())
    assert report["peak_rss_mb"] > 0 and json.loads(out)["peak_rss_mb"] == report["peak_rss_mb"]
    assert report["quantize_seconds"] == report["phases"]["quantize"]["seconds"]
    assert report["seconds_breakdown"]["eval_fp32"] == report["phases"]["eval fp32"]["seconds"]
    assert report["workspace"]["budget_mb"] > 0
    assert not (out_dir / ".spill").exists()
    md = (out_dir / "report.md").read_text()
    assert md.startswith("# hybridquant") and "## Time and memory" in md and "| eval quantized |" in md

    code, out, err = _run(capsys, "eval", "--qmodel", str(out_dir / "model.hq"), "--data", str(data_dir),
                          "--workers", "0", "--batch-size", "5")
    assert code == 0, err
    assert json.loads(out)["top1"] == report["quant_top1"]


def test_quantize_lists_float_ops(tmp_path, capsys, base_args):
    out_dir = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", *base_args, "--calib", "4", "--float-ops", "*.softmax", "--out-dir", str(out_dir))
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["float_nodes"]) == 9
    assert "softmax" in (out_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--wbits", "1"], "wbits"),
        (["--abits", "12"], "abits"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--calib", "1000"], "asked for 1000 calibration images but the train split has 12"),
        (["--scales", "log"], "--scales"),
        (["--float-ops", "nothing*"], "matches no node"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, base_args, extra, message):
    out_dir = tmp_path / "q"
    code, out, err = _run(capsys, "quantize", *base_args, "--calib", "4", *extra, "--out-dir", str(out_dir))
    assert code == 2
    # one line; a progress bar before it (loading the calibration images) is erased in place with "\r"
    assert message in err and len(err.strip().split("\n")) == 1
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_model_with_an_unquantizable_op(tmp_path, capsys, data_dir, monkeypatch):
    """The capture names the op and its node before any calibration image is read."""
    import timm
    import torch

    from hybridquant import pipeline
    from tests.conftest import CLASSES, pretrained_cfg

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration images read before the capture")

    monkeypatch.setattr(pipeline, "load_calibration", no_calibration)

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=len(CLASSES))  # has max pooling
    ckpt = tmp_path / "r.pt"
    torch.save({"state_dict": model.state_dict(), "pretrained_cfg": pretrained_cfg(32)}, ckpt)
    code, _, err = _run(capsys, "quantize", "--model", "resnet10t", "--checkpoint", str(ckpt), "--data", str(data_dir),
                        "--method", "minmax", "--workers", "0", "--calib", "4", "--out-dir", str(tmp_path / "q"))
    assert code == 2 and "cannot quantize op" in err and "max_pool2d" in err and "node" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_qmodel(tmp_path, capsys, data_dir):
    bad = tmp_path / "model.hq"
    bad.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = _run(capsys, "eval", "--qmodel", str(bad), "--data", str(data_dir), "--workers", "0")
    assert code == 2 and "cannot read quantized model" in err


def test_eval_integer_matches_the_simulation(tmp_path, capsys, base_args, data_dir):
    out_dir = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", *base_args, "--calib", "6", "--scales", "pot", "--out-dir", str(out_dir))
    assert code == 0, err
    code, out, err = _run(capsys, "eval", "--qmodel", str(out_dir / "model.hq"), "--integer", "--data", str(data_dir),
                          "--workers", "0")
    assert code == 0, err
    result = json.loads(out)
    assert result["agreement_sim"] == 1.0 and result["max_logit_diff_lsb"] == 0.0
    report = json.loads((out_dir / "report.json").read_text())
    assert result["top1"] == report["quant_top1"]


def test_eval_runtime_c_matches_the_simulation_and_the_integer_program(tmp_path, capsys, base_args, data_dir):
    from tests.export.test_c_runtime import compiler

    compiler()  # skips only off CI on a machine without one
    out_dir = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", *base_args, "--calib", "6", "--scales", "pot", "--out-dir", str(out_dir))
    assert code == 0, err
    code, out, err = _run(capsys, "eval", "--qmodel", str(out_dir / "model.hq"), "--runtime", "c", "--data",
                          str(data_dir), "--workers", "0", "--out", str(tmp_path / "c.json"))
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "c.json").read_text())
    assert result["runtime"] == "c" and result["images"] > 0 and result["images_per_second"] > 0
    assert result["max_logit_diff_lsb"] == 0 and result["agreement_sim"] == 1.0
    assert result["agreement_integer"] == 1.0 and result["identical_integer"] == 1.0
    report = json.loads((out_dir / "report.json").read_text())
    assert result["top1"] == report["quant_top1"]  # the C program classifies the eval images as the simulation


def test_eval_integer_refuses_float_scales(tmp_path, capsys, base_args, data_dir):
    out_dir = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", *base_args, "--calib", "6", "--out-dir", str(out_dir))
    assert code == 0, err
    code, _, err = _run(capsys, "eval", "--qmodel", str(out_dir / "model.hq"), "--integer", "--data", str(data_dir),
                        "--workers", "0")
    assert code == 2 and "not a power of two" in err


@pytest.mark.parametrize("flags, changes", [
    ([], {}),
    (["--no-lut-zero-point"], {"lut_zero_point": False}),
    (["--no-lut-thresholds"], {"lut_thresholds": False}),
    (["--no-ptf", "--no-channel-shift"], {"ptf": False, "channel_shift": False}),
    (["--no-reconstruction", "--reconstruction-iters", "7"], {"reconstruction": False, "reconstruction_iters": 7}),
])
def test_hfq_switches_reach_the_config(flags, changes):
    from hybridquant.cli import _quant_config, build_parser
    from hybridquant.config import QuantConfig

    args = build_parser().parse_args(["quantize", "--model", "m", "--data", "d", "--out-dir", "o",
                                      "--method", "hfq", "--scales", "pot", *flags])
    want = QuantConfig(method="hfq", scales="pot").replace(**changes)
    assert want.pot_rounding == "objective"
    assert _quant_config(args) == want


# --- issue 22 item 4: the CLI's defaults are QuantConfig's ------------------------------------------------------
@pytest.mark.parametrize("flags, kwargs", [
    ([], {}),
    (["--method", "minmax"], {"method": "minmax"}),
    (["--method", "hfq", "--scales", "float"], {"method": "hfq", "scales": "float"}),
    (["--pot-rounding", "round"], {"pot_rounding": "round"}),
    (["--method", "minmax", "--scales", "pot"], {"method": "minmax", "scales": "pot"}),
    (["--method", "ptq4vit", "--pot-rounding", "ceil"], {"method": "ptq4vit", "pot_rounding": "ceil"}),
    (["--wbits", "6", "--abits", "4", "--first-last-8bit", "--float-ops", "a*, b"],
     {"wbits": 6, "abits": 4, "first_last_8bit": True, "float_ops": ("a*", "b")}),
    (["--method", "percentile", "--percentile", "99.9", "--shift-terms", "2"],
     {"method": "percentile", "percentile": 99.9, "shift_terms": 2}),
    (["--no-ptf", "--reconstruction-iters", "5", "--alpha", "float"],
     {"ptf": False, "reconstruction_iters": 5, "alpha_pot": False}),
    (["--method", "smoothquant", "--smoothquant-alpha", "0.7"], {"method": "smoothquant", "alpha": 0.7}),
    (["--method", "hyq", "--hyq-iters", "12"], {"method": "hyq", "iters": 12}),
], ids=["none", "minmax", "hfq-float", "pot-rounding-round", "minmax-pot", "ptq4vit-ceil", "bits", "percentile",
        "switch", "smoothquant", "hyq"])
def test_cli_config_equals_api_config(flags, kwargs):
    from hybridquant.cli import _quant_config, build_parser
    from hybridquant.config import QuantConfig

    args = build_parser().parse_args(["quantize", "--model", "m", "--data", "d", "--out-dir", "o", *flags])
    assert _quant_config(args) == QuantConfig.build(**kwargs)
    assert _quant_config(args).to_dict() == QuantConfig.build(**kwargs).to_dict()


@pytest.mark.parametrize("flags, owner", [(["--method", "minmax", "--no-reconstruction"], "hfq"),
                                          (["--percentile", "99"], "percentile"),
                                          (["--method", "hfq", "--hyq-iters", "3"], "hyq")])
def test_an_option_of_another_method_is_a_one_line_error(tmp_path, capsys, flags, owner):
    """An option the chosen method does not read would change nothing: refused, before any work."""
    out_dir = tmp_path / "o"
    code = main(["quantize", "--model", "m", "--data", str(tmp_path), "--out-dir", str(out_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2 and f"of --method {owner}" in err and len(err.strip().split("\n")) == 1
    assert not out_dir.exists()


def test_every_method_option_has_one_flag_and_the_methods_match_their_configs():
    from hybridquant.cli import _method_flags
    from hybridquant.config import METHOD_CONFIGS
    from hybridquant.methods import METHODS

    flags = [flag for _, _, flag, _ in _method_flags()]
    assert len(flags) == len(set(flags))
    assert METHODS.keys() == METHOD_CONFIGS.keys()
    assert all(METHODS[m].config_class is METHOD_CONFIGS[m] for m in METHODS)


def test_no_flags_is_hfq_pot_objective():
    from hybridquant.cli import _quant_config, build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--data", "d", "--out-dir", "o"])
    c = _quant_config(args)
    assert (c.method, c.scales, c.pot_rounding) == ("hfq", "pot", "objective")


def test_switches_turn_off_fields_that_default_to_on():
    from hybridquant.cli import _method_flags
    from hybridquant.config import field_defaults

    switches = [(f, flag) for _, f, flag, _ in _method_flags() if flag.startswith("--no-")]
    assert len(switches) == 9 and all(f.default is True for f, _ in switches)  # hfq's ablations
    assert field_defaults()["first_last_8bit"] is False  # --first-last-8bit can only switch it on


def test_help_states_the_defaults(capsys):
    from hybridquant.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default hfq)" in text
    assert "default: pot for hfq, float for the other methods" in text
    assert "default: objective for hfq, round for the other methods" in text
    assert "weight bits: 2-8 or 16 (default 8)" in text


# --- issue 23: --memory-budget ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("6G", 6 * 2**30), ("512M", 512 * 2**20), ("2.5GB", int(2.5 * 2**30)),
                                        ("1.5GiB", int(1.5 * 2**30)), ("64k", 65536), ("1000000", 1_000_000),
                                        ("4096B", 4096), (" 2 g ", 2 * 2**30), (".5M", 2**19)])
def test_memory_budget_sizes(text, size):
    from hybridquant.cli import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "0M", "-1G", "abc", "6X", "1e9", "G", "", "0.1", "nan", "inf", "1.2.3G"])
def test_bad_memory_budget_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch, base_args, text):
    import hybridquant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("work started"))
    out_dir = tmp_path / "q"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", *base_args, f"--memory-budget={text}", "--out-dir", str(out_dir)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--memory-budget" in err and "expected a positive size" in err
    assert not out_dir.exists()


@pytest.mark.parametrize("flag, budget", [([], None), (["--memory-budget", "512M"], 512 * 2**20)])
def test_memory_budget_reaches_quantize_graph_and_the_spill_folder_goes(tmp_path, capsys, monkeypatch, base_args,
                                                                        flag, budget):
    """The budget becomes the run's Workspace (default: the machine's); its spill folder, under --out-dir, is
    removed at the end, also when the run fails."""
    import hybridquant.pipeline as pipeline
    from hybridquant.errors import HybridQuantError
    from hybridquant.store import default_budget

    seen = []

    def quantize_graph(graph, config, calib, progress=False, workspace=None):
        seen.append(workspace.budget)
        (workspace.spill_dir() / "chunk.bin").write_bytes(b"spilled")
        assert (tmp_path / "q" / ".spill").is_dir()
        raise HybridQuantError("stopped after spilling")

    monkeypatch.setattr(pipeline, "quantize_graph", quantize_graph)
    code, _, err = _run(capsys, "quantize", *base_args, "--calib", "4", *flag, "--out-dir", str(tmp_path / "q"))
    assert code == 2 and "stopped after spilling" in err
    assert seen == [budget if budget is not None else default_budget()]
    assert not (tmp_path / "q" / ".spill").exists()


def test_memory_budget_is_not_part_of_the_config():
    from hybridquant.cli import _quant_config, build_parser

    argv = ["quantize", "--model", "m", "--data", "d", "--out-dir", "o"]
    parser = build_parser()
    assert _quant_config(parser.parse_args([*argv, "--memory-budget", "1G"])) == _quant_config(parser.parse_args(argv))

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
    assert (out_dir / "report.md").read_text().startswith("# hybridquant")

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
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_model_with_an_unquantizable_op(tmp_path, capsys, data_dir):
    import timm
    import torch

    from tests.conftest import CLASSES, pretrained_cfg

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=len(CLASSES))  # has max pooling
    ckpt = tmp_path / "r.pt"
    torch.save({"state_dict": model.state_dict(), "pretrained_cfg": pretrained_cfg(32)}, ckpt)
    code, _, err = _run(capsys, "quantize", "--model", "resnet10t", "--checkpoint", str(ckpt), "--data", str(data_dir),
                        "--method", "minmax", "--workers", "0", "--calib", "4", "--out-dir", str(tmp_path / "q"))
    assert code == 2 and "cannot quantize op" in err and "max_pool2d" in err


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
    (["--method", "percentile", "--percentile", "99.9", "--shift-terms", "2", "--alpha", "float"],
     {"method": "percentile", "percentile": 99.9, "shift_terms": 2, "alpha_pot": False}),
    (["--no-ptf", "--reconstruction-iters", "5"], {"ptf": False, "reconstruction_iters": 5}),
], ids=["none", "minmax", "hfq-float", "pot-rounding-round", "minmax-pot", "ptq4vit-ceil", "bits", "percentile",
        "switch"])
def test_cli_config_equals_api_config(flags, kwargs):
    from hybridquant.cli import _quant_config, build_parser
    from hybridquant.config import QuantConfig

    args = build_parser().parse_args(["quantize", "--model", "m", "--data", "d", "--out-dir", "o", *flags])
    assert _quant_config(args) == QuantConfig(**kwargs)
    assert _quant_config(args).to_dict() == QuantConfig(**kwargs).to_dict()


def test_no_flags_is_hfq_pot_objective():
    from hybridquant.cli import _quant_config, build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--data", "d", "--out-dir", "o"])
    c = _quant_config(args)
    assert (c.method, c.scales, c.pot_rounding) == ("hfq", "pot", "objective")


def test_switches_turn_off_fields_that_default_to_on():
    from hybridquant.cli import _SWITCHES
    from hybridquant.config import field_defaults

    d = field_defaults()
    assert all(d[name] is True for name, _ in _SWITCHES.values())
    assert d["first_last_8bit"] is False  # --first-last-8bit can only switch it on


def test_help_states_the_defaults(capsys):
    from hybridquant.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default hfq)" in text
    assert "default: pot for hfq, float for the other methods" in text
    assert "default: objective for hfq, round for the other methods" in text
    assert "weight bits: 2-8 or 16 (default 8)" in text

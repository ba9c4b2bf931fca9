"""`hybridquant export`: writes npz / C header from model.hq; one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hybridquant import qmodel
from hybridquant.cli import main
from hybridquant.config import QuantConfig
from hybridquant.integer.executor import IntegerModel
from hybridquant.quantize import quantize_graph
from tests.export import reference_reader as rr
from tests.methods.conftest import make_toy_graph

META = {"name": "toy", "num_classes": 3, "class_names": ["a", "b", "c"],
        "data_cfg": {"input_size": [3, 6, 6], "mean": [0.5] * 3, "std": [0.25] * 3}}


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return list((torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1).split(8))


@pytest.fixture(scope="module")
def pot_model(tmp_path_factory):
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="hfq", scales="pot", wbits=6, abits=6), _calib())
    path = tmp_path_factory.mktemp("hq") / "model.hq"
    qmodel.save(path, qg, META)
    return path


def test_export_npz_reproduces_the_loaded_model(pot_model, tmp_path, capsys):
    out = tmp_path / "deploy" / "toy.npz"
    code, stdout, err = _run(capsys, "export", "--qmodel", str(pot_model), "--format", "npz", "--out", str(out))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["format"] == "npz" and summary["out"] == str(out) and summary["bytes"] == out.stat().st_size
    program = rr.load(out)
    assert program.manifest["model"]["class_names"] == ["a", "b", "c"]
    qg, _ = qmodel.load(pot_model)
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 2 - 1
    logits, want = IntegerModel(qg).run(x)
    got_logits, got = rr.run(program, x.numpy())
    assert np.array_equal(got, want.q.numpy()) and np.array_equal(got_logits, logits.numpy())
    assert [p.name for p in out.parent.iterdir()] == ["toy.npz"]  # no temporary files left


def test_export_c(pot_model, tmp_path, capsys):
    out = tmp_path / "toy.h"
    code, stdout, err = _run(capsys, "export", "--qmodel", str(pot_model), "--format", "c", "--out", str(out))
    assert code == 0, err
    assert json.loads(stdout)["format"] == "c"
    text = out.read_text()
    assert text.startswith("/* Integer program exported by hybridquant") and "model: toy;" in text
    if shutil.which("gcc"):
        import subprocess

        subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-fsyntax-only", str(out)], check=True)


def _assert_one_line_error(code, err, message, out):
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_truncated_model(tmp_path, capsys):
    bad = tmp_path / "model.hq"
    bad.write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "x.npz"
    code, _, err = _run(capsys, "export", "--qmodel", str(bad), "--out", str(out))
    _assert_one_line_error(code, err, "cannot read quantized model", out)


def test_malformed_model(tmp_path, capsys, pot_model):
    foreign = tmp_path / "foreign.hq"
    torch.save({"format": "something-else"}, foreign)
    out = tmp_path / "x.h"
    code, _, err = _run(capsys, "export", "--qmodel", str(foreign), "--format", "c", "--out", str(out))
    _assert_one_line_error(code, err, "not a hybridquant model", out)
    broken = tmp_path / "broken.hq"
    data = torch.load(pot_model, weights_only=True)
    del data["nodes"][1]["op"]
    torch.save(data, broken)
    code, _, err = _run(capsys, "export", "--qmodel", str(broken), "--out", str(out))
    _assert_one_line_error(code, err, "malformed model.hq", out)
    code, _, err = _run(capsys, "export", "--qmodel", str(tmp_path / "missing.hq"), "--out", str(out))
    _assert_one_line_error(code, err, "quantized model not found", out)


def test_float_multipliers_are_refused(tmp_path, capsys):
    qg = quantize_graph(make_toy_graph(), QuantConfig(scales="float"), _calib())
    path = tmp_path / "model.hq"
    qmodel.save(path, qg, META)
    for fmt in ("npz", "c"):
        out = tmp_path / f"x.{fmt}"
        code, _, err = _run(capsys, "export", "--qmodel", str(path), "--format", fmt, "--out", str(out))
        _assert_one_line_error(code, err, "not a power of two", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.hq"]


def test_bad_arguments(pot_model, tmp_path, capsys):
    out = tmp_path / "x.tflite"
    with pytest.raises(SystemExit) as exc:  # argparse errors exit from the parser
        main(["export", "--qmodel", str(pot_model), "--format", "tflite", "--out", str(out)])
    _assert_one_line_error(exc.value.code, capsys.readouterr().err, "invalid choice: 'tflite'", out)
    code, _, err = _run(capsys, "export", "--qmodel", str(pot_model), "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1

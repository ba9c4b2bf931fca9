"""`hybridquant export`: writes npz / C header from model.hq; one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridquant import qmodel
from hybridquant.cli import main
from hybridquant.config import QuantConfig
from hybridquant.export import reader as rr
from hybridquant.integer.executor import IntegerModel
from hybridquant.quantize import quantize_graph
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
    out.parent.mkdir()  # --out's folder must exist
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
    assert np.array_equal(got, want.numpy()) and np.array_equal(got_logits, logits.numpy())
    assert [p.name for p in out.parent.iterdir()] == ["toy.npz"]  # no temporary files left


def test_export_c(pot_model, tmp_path, capsys):
    from .test_c_runtime import build

    out = tmp_path / "toy"
    code, stdout, err = _run(capsys, "export", "--qmodel", str(pot_model), "--format", "c", "--out", str(out))
    assert code == 0, err
    result = json.loads(stdout)
    assert result["format"] == "c" and "model.c" in result["files"] and result["scratch_bytes"] > 0
    assert '"a", "b", "c"' in (out / "model.c").read_text()  # the class names
    assert build(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["toy"] or "model.hq" in {p.name for p in tmp_path.iterdir()}


def _assert_one_line_error(code, err, message, out):
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_truncated_model(tmp_path, capsys, pot_model):
    out = tmp_path / "x.npz"
    bad = tmp_path / "model.hq"
    for content in (b"PK\x03\x04 truncated", pot_model.read_bytes()[: pot_model.stat().st_size // 2]):
        bad.write_bytes(content)
        code, _, err = _run(capsys, "export", "--qmodel", str(bad), "--out", str(out))
        _assert_one_line_error(code, err, f"cannot read quantized model {bad}: not a valid or complete model.hq file", out)


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
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="float"), _calib())
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


@pytest.fixture
def program_for_data(tmp_path, data_dir):
    """An exported toy program whose classes are the synthetic ImageFolder's."""
    from tests.conftest import CLASSES

    qg = quantize_graph(make_toy_graph(), QuantConfig(method="hfq", scales="pot", wbits=6, abits=6), _calib())
    meta = {**META, "class_names": list(CLASSES), "num_classes": len(CLASSES)}
    path = tmp_path / "model.hq"
    qmodel.save(path, qg, meta)
    out = tmp_path / "toy.npz"
    assert main(["export", "--qmodel", str(path), "--format", "npz", "--out", str(out)]) == 0
    return path, out


def test_eval_program_matches_the_integer_executor(program_for_data, data_dir, tmp_path, capsys):
    hq, npz = program_for_data
    capsys.readouterr()
    result = tmp_path / "program.json"
    code, _, err = _run(capsys, "eval", "--program", str(npz), "--data", str(data_dir), "--workers", "0",
                        "--out", str(result))
    assert code == 0, err
    got = json.loads(result.read_text())
    code, stdout, err = _run(capsys, "eval", "--qmodel", str(hq), "--integer", "--data", str(data_dir), "--workers", "0")
    assert code == 0, err
    want = json.loads(stdout)
    assert got["images"] == want["images"] == 12 and got["top1"] == want["top1"]


def test_eval_program_bad_files(program_for_data, data_dir, tmp_path, capsys):
    _, npz = program_for_data
    out = tmp_path / "r.json"

    def check(path, message):
        code, _, err = _run(capsys, "eval", "--program", str(path), "--data", str(data_dir), "--out", str(out))
        _assert_one_line_error(code, err, message, out)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    check(truncated, f"cannot read integer program {truncated}: not a valid or complete npz file")
    check(tmp_path / "missing.npz", f"integer program not found: {tmp_path / 'missing.npz'}")
    check(tmp_path, f"integer program {tmp_path} is a directory, not a file")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    check(garbage, f"cannot read integer program {garbage}: not a valid or complete npz file")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    check(foreign, "not an exported integer program")
    manifest, arrays = rr.load(npz).manifest, dict(rr.load(npz).arrays)
    arrays.pop(next(iter(manifest["ops"][1]["arrays"].values()))["key"])  # drop one weight array
    broken = tmp_path / "broken.npz"
    np.savez(broken, __manifest__=np.array(json.dumps(manifest)), **arrays)
    check(broken, "malformed integer program")


def test_eval_onnx_truncated_file(pot_model, data_dir, tmp_path, capsys):
    """A truncated export is one line naming the file, not onnxruntime's protobuf error."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    good = tmp_path / "toy.onnx"
    code, _, err = _run(capsys, "export", "--qmodel", str(pot_model), "--format", "onnx", "--out", str(good))
    assert code == 0, err
    out = tmp_path / "r.json"
    for name, size in (("half.onnx", good.stat().st_size // 2), ("head.onnx", 40)):
        bad = tmp_path / name
        bad.write_bytes(good.read_bytes()[:size])
        code, _, err = _run(capsys, "eval", "--onnx", str(bad), "--data", str(data_dir), "--workers", "0", "--out", str(out))
        _assert_one_line_error(code, err, f"cannot read ONNX model {bad}: not a valid or complete ONNX file", out)

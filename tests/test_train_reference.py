"""scripts/train_reference.py: an outside trainer whose checkpoint hybridquant must reproduce."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hybridquant.cli import main as hq_main
from hybridquant.data import data_config, eval_transform, image_folder
from hybridquant.models import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_is_independent_of_hybridquant():
    code = SCRIPT.read_text()
    assert "import hybridquant" not in code and "from hybridquant" not in code


def test_smoke_run_and_hybridquant_reproduces_its_top1(ref, tmp_path, data_dir, capsys):
    out = tmp_path / "ref.pt"
    args = [
        "--data",
        str(data_dir),
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--img-size",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert ref.main(args) == 0
    assert "reference top-1:" in capsys.readouterr().out

    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # loadable without pickled objects
    assert set(ckpt) == {"state_dict", "pretrained_cfg", "reference_top1", "recipe"}
    assert ckpt["pretrained_cfg"] == {
        "input_size": [3, 32, 32],
        "mean": list(ref.CIFAR10_MEAN),
        "std": list(ref.CIFAR10_STD),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    assert ckpt["recipe"]["steps"] == 2 and ckpt["recipe"]["seed"] == 1234

    rc = hq_main(
        [
            "eval",
            "--model",
            "mobilevit_xxs",
            "--checkpoint",
            str(out),
            "--data",
            str(data_dir),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--batch-size",
            "5",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(ckpt["reference_top1"], abs=1e-9)


def test_preprocessing_matches_hybridquant(ref, data_dir):
    """The script's eval transform and hybridquant's (from the checkpoint's data config) agree."""
    args = ref.parse_args(["--data", str(data_dir)])
    _, test_set = ref.build_data(args)
    cfg = {
        "input_size": (3, 64, 64),
        "mean": ref.CIFAR10_MEAN,
        "std": ref.CIFAR10_STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    ours = image_folder(data_dir, "eval", eval_transform(data_config(cfg)))
    assert ours.classes == test_set.classes
    for i in (0, len(ours) - 1):
        assert torch.allclose(ours[i][0], test_set[i][0], atol=1e-6)
    # and the architecture it trains is the one hybridquant builds
    assert load_model(ref.ARCH, num_classes=3).name == "mobilevit_xxs"

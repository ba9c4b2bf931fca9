"""Data-parallel ``eval`` under torchrun: 2 CPU ranks (gloo) give exactly the single-process result.

The eval split has 23 images, so the two shards differ in size (12 and 11): a sampler that pads the
shards to one length counts an image twice (24 images), one that drops the remainder loses one, and a
gather that ignores the shards' order permutes the predictions — each fails the comparison.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridquant import qmodel
from hybridquant.cli import main
from hybridquant.config import QuantConfig
from hybridquant.data import data_config, eval_transform, image_folder
from hybridquant.distributed import (
    all_reduce_ints,
    gather_shards,
    is_distributed,
    is_main,
    process_group,
    shard_indices,
    world_size,
)
from hybridquant.graph import capture
from hybridquant.quantize import quantize_graph
from tests.conftest import ARCH, QIMG, make_bn_model, pretrained_cfg, write_images

# 7 classes, so that top-5 is not trivially 1; 23 images, so that the shards over 2 ranks differ in size
EVAL_COUNTS = dict(zip("abcdefg", [4, 3, 3, 3, 3, 4, 3], strict=True))
EVAL_IMAGES = sum(EVAL_COUNTS.values())


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "data"
    write_images(root / "test", EVAL_COUNTS, seed=3)
    return root


@pytest.fixture(scope="module")
def eval_images(odd_data) -> torch.Tensor:
    """The eval split as the CLI preprocesses it, in its order."""
    cfg = data_config(pretrained_cfg(QIMG))
    return torch.stack([x for x, _ in image_folder(odd_data, "eval", eval_transform(cfg))])


@pytest.fixture(scope="module")
def spread_model(eval_images) -> torch.nn.Module:
    """A seeded 7-class model whose head is centred on the eval images' features.

    A random model puts every noise image in one class, and then predictions in any order look the same;
    centred, it predicts most of the 7 classes, so a misordered gather shows."""
    model = make_bn_model(num_classes=len(EVAL_COUNTS))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(eval_images), pre_logits=True)
        model.head.fc.bias.copy_(-features.mean(0) @ model.head.fc.weight.T)
    return model


@pytest.fixture(scope="module")
def spread_ckpt(tmp_path_factory, spread_model) -> Path:
    path = tmp_path_factory.mktemp("ckpt7") / "spread.pt"
    torch.save({"model": ARCH, "state_dict": spread_model.state_dict(), "num_classes": len(EVAL_COUNTS),
                "class_names": list(EVAL_COUNTS), "pretrained_cfg": pretrained_cfg(QIMG)}, path)
    return path


@pytest.fixture(scope="module")
def spread_qmodel(tmp_path_factory, spread_model, eval_images) -> Path:
    """The model quantized W8A8: its logits tie often, a hard case for exact agreement.

    Calibrated on the eval images with float scales, so that it keeps the spread of the float model's
    predictions (power-of-two scales lose the centring of the head and predict one class)."""
    path = tmp_path_factory.mktemp("hq7") / "model.hq"
    graph = capture(spread_model, (3, QIMG, QIMG))
    qgraph = quantize_graph(graph, QuantConfig(method="minmax", scales="float"), eval_images)
    qmodel.save(path, qgraph, {"name": ARCH, "num_classes": len(EVAL_COUNTS), "class_names": list(EVAL_COUNTS),
                               "data_cfg": pretrained_cfg(QIMG)})
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(capsys, argv: list[str], out: Path) -> dict:
    assert main([*argv, "--out", str(out), "--predictions"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads(out.read_text())


def _torchrun(argv: list[str], out: Path, nproc: int = 2) -> tuple[dict, str]:
    """``torchrun --nproc_per_node nproc -m hybridquant <argv> --out out --predictions``; the written JSON and stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "hybridquant", *argv, "--out", str(out), "--predictions"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _assert_same_evaluation(single: dict, sharded: dict) -> None:
    assert single["images"] == sharded["images"] == EVAL_IMAGES
    assert len(set(single["predictions"])) >= 4 and 0 < single["top5"] < 1  # order and top-5 both tell
    assert len(sharded["predictions"]) == EVAL_IMAGES
    assert sharded["predictions"] == single["predictions"]
    assert (sharded["top1"], sharded["top5"]) == (single["top1"], single["top5"])


def _common(data: Path) -> list[str]:
    return ["--data", str(data), "--workers", "0", "--device", "cpu", "--batch-size", "4"]


# --------------------------------------------------------------------------- torchrun, 2 ranks


def test_torchrun_eval_model_equals_single_process(capsys, tmp_path, odd_data, spread_ckpt):
    argv = ["eval", "--model", ARCH, "--checkpoint", str(spread_ckpt), *_common(odd_data)]
    single = _single(capsys, argv, tmp_path / "single.json")
    sharded, stdout = _torchrun(argv, tmp_path / "sharded.json")
    _assert_same_evaluation(single, sharded)
    assert json.loads(stdout) == sharded  # one JSON document: rank 0 alone printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.json", "single.json"]


def test_torchrun_eval_qmodel_equals_single_process(capsys, tmp_path, odd_data, spread_qmodel):
    argv = ["eval", "--qmodel", str(spread_qmodel), *_common(odd_data)]
    single = _single(capsys, argv, tmp_path / "single.json")
    sharded, _ = _torchrun(argv, tmp_path / "sharded.json")
    _assert_same_evaluation(single, sharded)


# --------------------------------------------------------------------------- the helpers, one process


@pytest.mark.parametrize("total", [0, 1, 2, 23, 24])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_cover_everything_and_balanced(total, world):
    shards = [list(shard_indices(total, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(total))
    assert {len(s) for s in shards} <= {total // world, -(-total // world)}


def test_single_process_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu"):
        assert not is_distributed() and is_main() and world_size() == 1
        assert all_reduce_ints([3, 5]) == [3, 5]
        local = torch.arange(7)
        assert gather_shards(local, 7) is local


def test_unsplittable_evaluations_are_refused_under_torchrun(capsys, monkeypatch, tmp_path, odd_data):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group is joined
    program = tmp_path / "p.npz"
    program.write_bytes(b"")
    assert main(["eval", "--program", str(program), *_common(odd_data)]) == 2
    assert "under torchrun eval splits --model and --qmodel only" in capsys.readouterr().err


def test_predictions_are_refused_with_integer(capsys, tmp_path, odd_data):
    hq = tmp_path / "model.hq"
    hq.write_bytes(b"")  # refused before it is read
    assert main(["eval", "--qmodel", str(hq), "--integer", "--predictions", *_common(odd_data)]) == 2
    assert "--predictions is not available with --integer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def calib_data(tmp_path_factory) -> Path:
    """The odd eval split and a small train split to calibrate on."""
    root = tmp_path_factory.mktemp("odd_train") / "data"
    write_images(root / "test", EVAL_COUNTS, seed=3)
    write_images(root / "train", dict.fromkeys(EVAL_COUNTS, 2), seed=4)
    return root


def test_torchrun_quantize_writes_the_single_process_model(capsys, tmp_path, calib_data, spread_ckpt):
    """Under torchrun the evaluations are split and calibration runs whole on each rank: the same model.hq
    bytes, the same top-1 and agreement, and one set of outputs (rank 0's)."""
    def argv(out: Path) -> list[str]:
        return ["quantize", "--model", ARCH, "--checkpoint", str(spread_ckpt), "--method", "minmax",
                "--scales", "float", "--calib", "8", *_common(calib_data), "--out-dir", str(out)]

    assert main(argv(tmp_path / "single")) == 0, capsys.readouterr().err
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "hybridquant", *argv(tmp_path / "sharded")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp_path / "single" / "report.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert sharded["eval_images"] == single["eval_images"] == EVAL_IMAGES
    assert (single["eval_ranks"], sharded["eval_ranks"]) == (1, 2)
    for key in ("fp32_top1", "quant_top1", "agreement_fp32", "drop_pp"):
        assert sharded[key] == single[key], key
    assert (tmp_path / "sharded" / "model.hq").read_bytes() == (tmp_path / "single" / "model.hq").read_bytes()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["model.hq", "report.json", "report.md"]
    assert json.loads(proc.stdout)["quant_top1"] == single["quant_top1"]  # rank 0 alone printed

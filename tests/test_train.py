"""Training: a one-epoch run on the synthetic folder, resume, and the lr schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hybridquant import train as train_mod
from hybridquant.cli import main
from hybridquant.data import DataOverrides
from hybridquant.errors import HybridQuantError
from hybridquant.models import load_model
from hybridquant.train import TrainRecipe, lr_at, train
from tests.conftest import ARCH, CLASSES, TEST_COUNTS

TINY = dict(epochs=1, batch_size=4, lr=1e-3, warmup_epochs=0.5, seed=0)
OVERRIDES = DataOverrides(img_size=32, interpolation="bilinear", crop_pct=1.0)


def test_one_epoch_writes_a_complete_checkpoint(tmp_path, data_dir):
    out = tmp_path / "ckpt" / "tiny.pt"
    metrics = train(ARCH, data_dir, out, TrainRecipe(**TINY), OVERRIDES, workers=0)
    assert out.is_file()
    assert not out.with_name(out.name + ".state").exists()  # resume state removed at the end
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.pt"]  # no temp files
    assert metrics["images"] == sum(TEST_COUNTS.values()) and 0 <= metrics["top1"] <= 1

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["model"] == ARCH and ckpt["num_classes"] == len(CLASSES)
    assert ckpt["class_names"] == CLASSES
    cfg = ckpt["pretrained_cfg"]
    assert list(cfg["input_size"]) == [3, 32, 32]
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3 and all(s > 0 for s in cfg["std"])
    recipe = ckpt["recipe"]
    for key, value in TINY.items():
        assert recipe[key] == value
    assert {"lr", "min_lr", "weight_decay", "label_smoothing", "data"} <= recipe.keys()
    assert ckpt["metrics"]["history"][0]["epoch"] == 1

    # the checkpoint loads with everything eval needs
    loaded = load_model(ARCH, out)
    assert loaded.class_names == CLASSES and loaded.data_cfg["input_size"] == (3, 32, 32)


def test_training_is_seeded(tmp_path, data_dir):
    a = train(ARCH, data_dir, tmp_path / "a.pt", TrainRecipe(**TINY), OVERRIDES, workers=0)
    b = train(ARCH, data_dir, tmp_path / "b.pt", TrainRecipe(**TINY), OVERRIDES, workers=0)
    assert a == b
    sa = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_after_an_interrupted_run(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "run.pt"
    recipe = TrainRecipe(**{**TINY, "epochs": 2})
    state = out.with_name(out.name + ".state")

    class Interrupt(Exception):
        pass

    class StopAfterFirstEpoch(train_mod.tqdm):
        calls = 0

        @classmethod
        def write(cls, *args, **kwargs):  # called once per epoch, before the state is saved
            StopAfterFirstEpoch.calls += 1
            if StopAfterFirstEpoch.calls == 2:
                raise Interrupt

    monkeypatch.setattr(train_mod, "tqdm", StopAfterFirstEpoch)
    with pytest.raises(Interrupt):
        train(ARCH, data_dir, out, recipe, OVERRIDES, workers=0)
    assert state.is_file() and not out.exists()
    assert torch.load(state, weights_only=False)["epoch"] == 1
    monkeypatch.undo()

    # a different recipe must not silently continue from that state
    with pytest.raises(HybridQuantError, match="different run"):
        train(ARCH, data_dir, out, TrainRecipe(**{**TINY, "epochs": 3}), OVERRIDES, workers=0)

    train(ARCH, data_dir, out, recipe, OVERRIDES, workers=0)
    history = torch.load(out, weights_only=True)["metrics"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert not state.exists()


def test_batch_larger_than_the_train_split(tmp_path, data_dir):
    out = tmp_path / "big.pt"
    with pytest.raises(HybridQuantError, match="larger than the 12 training images"):
        train(ARCH, data_dir, out, TrainRecipe(**{**TINY, "batch_size": 64}), OVERRIDES, workers=0)
    assert not out.exists()


def test_train_and_eval_splits_must_agree(tmp_path, data_dir):
    (data_dir / "test" / "cat").rename(data_dir / "test" / "cow")
    with pytest.raises(HybridQuantError, match="different class folders"):
        train(ARCH, data_dir, tmp_path / "x.pt", TrainRecipe(**TINY), OVERRIDES, workers=0)


def test_cli_train_then_eval(capsys, tmp_path, data_dir):
    out = tmp_path / "cli.pt"
    rc = main(
        [
            "train",
            "--model",
            ARCH,
            "--data",
            str(data_dir),
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.25,0.25,0.25",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    # per-epoch rows come first (tqdm.write), then the JSON result
    assert json.loads(stdout[stdout.index("{") :])["checkpoint"] == str(out)
    assert torch.load(out, weights_only=True)["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    rc = main(
        [
            "eval",
            "--model",
            ARCH,
            "--checkpoint",
            str(out),
            "--data",
            str(data_dir),
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["images"] == sum(TEST_COUNTS.values())


# --------------------------------------------------------------------------- recipe and schedule


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("epochs", 0, "--epochs"),
        ("batch_size", 0, "--batch-size"),
        ("lr", 0.0, "--lr"),
        ("lr", 1.5, "--lr"),
        ("label_smoothing", 1.0, "label smoothing"),
    ],
)
def test_recipe_validation(field, value, needle):
    with pytest.raises(HybridQuantError, match=needle):
        TrainRecipe(**{field: value})


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.5, 2.0])
def test_lr_schedule_warmup_then_cosine(warmup_epochs):
    recipe = TrainRecipe(epochs=10, lr=2e-3, min_lr=1e-5, warmup_epochs=warmup_epochs)
    spe = 7
    total = recipe.epochs * spe
    warm = int(math.ceil(warmup_epochs * spe))
    lrs = [lr_at(recipe, s, spe) for s in range(total)]
    assert all(0 < lr <= recipe.lr + 1e-12 for lr in lrs)
    # warm-up: strictly increasing, linear, starting small
    if warm:
        assert lrs[0] == pytest.approx(recipe.lr / (warmup_epochs * spe))
        assert all(b > a for a, b in zip(lrs[:warm], lrs[1:warm], strict=False))
        assert all(lr >= recipe.min_lr for lr in lrs[warm:])
    # after the warm-up: the peak, then never increasing, down to about min_lr
    tail = lrs[warm:]
    assert max(lrs) == pytest.approx(recipe.lr, rel=0.05)
    assert all(b <= a + 1e-15 for a, b in zip(tail, tail[1:], strict=False))
    assert lr_at(recipe, total, spe) == pytest.approx(recipe.min_lr)
    assert lrs[-1] < 0.01 * recipe.lr
    # the cosine midpoint lies halfway between lr and min_lr
    mid = warmup_epochs * spe + (total - warmup_epochs * spe) / 2
    if float(mid).is_integer():
        assert lr_at(recipe, int(mid), spe) == pytest.approx((recipe.lr + recipe.min_lr) / 2)


def test_lr_warmup_reaches_peak_at_its_end():
    recipe = TrainRecipe(epochs=4, lr=1e-3, min_lr=0.0, warmup_epochs=1.0)
    assert lr_at(recipe, 9, 10) == pytest.approx(1e-3)  # last warm-up step
    assert lr_at(recipe, 10, 10) == pytest.approx(1e-3)  # first cosine step

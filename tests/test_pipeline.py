"""The pipeline streams the eval split: no phase holds its images, and the streamed evaluation is the one the
materialised images give (same images, same order, same predictions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import hybridquant.data as data_mod
from hybridquant.data import DataOverrides, balanced_subset, eval_transform, image_folder
from hybridquant.evaluate import evaluate
from hybridquant.pipeline import DataSpec, Prepared, fp32_result, prepare


@pytest.fixture
def prepared(q_ckpt_path, data_dir, monkeypatch) -> tuple[Prepared, list[str]]:
    """prepare() on the synthetic ImageFolder, with the paths of every image it read."""
    read: list[str] = []
    load = data_mod.load_image

    def counting(path: str):
        read.append(path)
        return load(path)

    monkeypatch.setattr(data_mod, "load_image", counting)
    spec = DataSpec(data_dir, DataOverrides(), limit=7, calib=4, batch_size=3, workers=0)
    return prepare("mobilevit_xxs", str(q_ckpt_path), False, spec, progress=False), read


def test_prepare_holds_no_eval_image(prepared):
    prep, read = prepared
    assert read and all(Path(p).parts[-3] == "train" for p in read)  # the calibration images only
    images = [f.name for f in dataclasses.fields(prep)
              if isinstance(getattr(prep, f.name), torch.Tensor) and getattr(prep, f.name).is_floating_point()]
    assert images == ["calib"]
    assert prep.eval_labels.dtype == torch.long and len(prep.eval_labels) == 7
    assert set(prep.phases) == {"load", "capture"} and prep.peak_rss_mb > 0


def test_streamed_evaluation_equals_the_materialised_one(prepared):
    prep, read = prepared
    read.clear()
    fp32 = fp32_result(prep, batch_size=3, progress=False)
    eval_reads = len(read)
    images, labels = prep.eval_tensors(batch_size=5)
    # the subset of --limit, in the same order: the labels the loader yields are the kept ones
    assert torch.equal(labels, torch.cat([y for _, y in prep.eval_loader(4)]))
    assert torch.equal(labels, torch.tensor([0, 0, 0, 1, 1, 2, 2]))  # round-robin over 4 + 3 + 5 images
    ref = evaluate(prep.loaded.model, list(zip(images.split(2), labels.split(2), strict=True)), progress=False)
    assert eval_reads == images.shape[0] == fp32.images == 7  # each image read once, none kept
    assert torch.equal(fp32.predictions, ref.predictions) and fp32.top1 == ref.top1 and fp32.top5 == ref.top5
    assert "eval fp32" in prep.phases and prep.phases["eval fp32"]["peak_rss_mb"] > 0


def _write_eval_split(root: Path, per_class: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "val" / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / c / f"{i:04d}.jpg")
    return root


def test_evaluation_memory_does_not_grow_with_the_images(tmp_path):
    """Ten times the images, the same peak: ~53 MB more if the 300 images (128×128, float) were held."""
    size = 128
    root = _write_eval_split(tmp_path, 100, size)
    cfg = {"input_size": (3, size, size), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
           "crop_pct": 1.0}
    dataset = image_folder(root, "eval", eval_transform(cfg))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 3))

    def peak(limit: int) -> float:
        subset = balanced_subset(dataset, limit)
        prep = Prepared(SimpleNamespace(model=model), cfg, None, torch.empty(0), subset,
                        torch.zeros(len(subset), dtype=torch.long))
        result = fp32_result(prep, batch_size=10, progress=False)
        assert result.images == limit
        return prep.phases["eval fp32"]["peak_rss_mb"]

    peak(30)  # warm-up: first-use allocations of the decoder and the kernels
    small, large = peak(30), peak(300)
    assert large - small < 15, (small, large)

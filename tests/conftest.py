"""Shared fixtures: a synthetic ImageFolder and tiny seeded timm checkpoints.

Everything is made in temporary folders; no test needs downloaded data or a
network. Images are 32x32 and models run at 32x32 so the suite stays fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

# Keep the suite light on small machines; torch reads this lazily per op.
torch.set_num_threads(int(os.environ.get("HQ_TEST_THREADS", "1")))

CLASSES = ["ant", "bee", "cat"]
TRAIN_COUNTS = {"ant": 4, "bee": 4, "cat": 4}
TEST_COUNTS = {"ant": 4, "bee": 3, "cat": 5}  # uneven on purpose: --limit must balance
ARCH = "mobilevit_xxs"
IMG = 32
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def write_images(folder: Path, counts: dict[str, int], seed: int, ext: str = ".jpg") -> None:
    """Random 32x32 RGB images, ``counts[class]`` of them per class folder."""
    rng = np.random.default_rng(seed)
    for ci, (name, count) in enumerate(sorted(counts.items())):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            # a class-dependent colour bias so the classes are not pure noise
            pixels = rng.integers(0, 256, size=(IMG, IMG, 3)).astype(np.int16)
            pixels[..., ci % 3] = np.clip(pixels[..., ci % 3] + 80, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"img_{i:03d}{ext}")


def make_image_folder(root: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    for k, split in enumerate(splits):
        write_images(root / split, TRAIN_COUNTS if split == "train" else TEST_COUNTS, seed=k)
    return root


def make_state_dict(
    num_classes: int = len(CLASSES), arch: str = ARCH, seed: int = 0
) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_cfg(size: int = IMG) -> dict:
    return {
        "input_size": [3, size, size],
        "mean": MEAN,
        "std": STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """ImageFolder root with train/ (3 classes x 4) and test/ (4 + 3 + 5 images)."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def state_dict() -> dict[str, torch.Tensor]:
    """A seeded, randomly initialised 3-class mobilevit_xxs state_dict."""
    return make_state_dict()


@pytest.fixture(scope="session")
def ckpt_path(tmp_path_factory, state_dict) -> Path:
    """A dict checkpoint with state_dict, model, class names and a 32x32 data config."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(
        {
            "model": ARCH,
            "state_dict": state_dict,
            "num_classes": len(CLASSES),
            "class_names": list(CLASSES),
            "pretrained_cfg": pretrained_cfg(),
        },
        path,
    )
    return path


@pytest.fixture
def save_ckpt(tmp_path: Path, state_dict):
    """Write a checkpoint variant: ``save_ckpt(name, obj)`` or ``save_ckpt(name, **keys)``."""

    def _save(name: str = "ckpt.pt", obj=None, **keys) -> Path:
        path = tmp_path / name
        if obj is None:
            obj = {"state_dict": state_dict, "pretrained_cfg": pretrained_cfg(), **keys}
        torch.save(obj, path)
        return path

    return _save


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Make timm's hub unreachable and its cache empty, whatever the machine has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # timm then fails on its own, which is also an offline error
        return
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"), raising=False)


# --- quantization engine fixtures ------------------------------------------------
QIMG = 64  # MobileViT needs 64x64 or more: its last stage works on 2x2 maps


def make_bn_model(arch: str = ARCH, num_classes: int = len(CLASSES), seed: int = 0,
                  img_size: int | None = None) -> torch.nn.Module:
    """A seeded model with non-trivial BatchNorm statistics (so folding is tested for real); ``img_size`` for
    the architectures that size their attention biases by it."""
    import timm

    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size is not None else {}
    model = timm.create_model(arch, num_classes=num_classes, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return model


@pytest.fixture(scope="session")
def mvit_model() -> torch.nn.Module:
    return make_bn_model()


@pytest.fixture(scope="session")
def mvit_graph(mvit_model):
    """mobilevit_xxs captured at 64x64 (session-scoped: capture takes seconds)."""
    from hybridquant.graph import capture

    return capture(mvit_model, (3, QIMG, QIMG))


@functools.cache
def family_model(arch: str) -> tuple[torch.nn.Module, Any]:
    """(model, its graph at 64x64) of a hybrid family's small model, built once per test session (capture
    takes seconds); mobilevit_xxs is the ``mvit_model`` / ``mvit_graph`` fixtures' model."""
    from hybridquant.graph import capture

    model = make_bn_model(arch, img_size=QIMG)
    return model, capture(model, (3, QIMG, QIMG))


@pytest.fixture(scope="session")
def calib_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, QIMG, QIMG, generator=gen) * 2 - 1


@pytest.fixture(scope="session")
def q_ckpt_path(tmp_path_factory) -> Path:
    """A 64x64 3-class checkpoint for end-to-end quantize tests."""
    path = tmp_path_factory.mktemp("qckpt") / "tiny64.pt"
    model = make_bn_model()
    torch.save(
        {"model": ARCH, "state_dict": model.state_dict(), "num_classes": len(CLASSES),
         "class_names": list(CLASSES), "pretrained_cfg": pretrained_cfg(QIMG)},
        path,
    )
    return path

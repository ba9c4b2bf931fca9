"""ImageFolder data: splits, preprocessing from the model's data config, subsets.

``--data DIR`` is an ImageFolder root holding ``train/`` and ``val/`` or
``test/``, each with one folder per class. Calibration images come from
``train/``; evaluation uses ``val/`` (or ``test/`` when there is no ``val/``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .errors import HybridQuantError

EVAL_SPLITS = ("val", "test")


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, turning any decoding failure into a user error."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as exc:
        raise HybridQuantError(f"cannot read image {path}: {type(exc).__name__}") from exc


def split_dir(root: str | Path, split: str) -> Path:
    """The folder of ``split`` (``train`` or ``eval``) under an ImageFolder root."""
    root = Path(root)
    if not root.is_dir():
        raise HybridQuantError(f"data folder not found: {root}")
    if split == "eval":
        for name in EVAL_SPLITS:
            if (root / name).is_dir():
                return root / name
        raise HybridQuantError(f"data folder {root} has no 'val/' or 'test/' split")
    if not (root / split).is_dir():
        raise HybridQuantError(f"data folder {root} has no '{split}/' split")
    return root / split


def image_folder(root: str | Path, split: str, transform=None) -> ImageFolder:
    """An ImageFolder for ``split`` whose loader reports unreadable images clearly."""
    folder = split_dir(root, split)
    try:
        return ImageFolder(str(folder), transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise HybridQuantError(f"no images in {folder}: {str(exc).splitlines()[0]}") from exc


#: an ImageNet class folder is named by its WordNet id
_WNID = re.compile(r"n\d{8}")


def _imagenet_labels(dataset: ImageFolder, num_classes: int) -> dict[str, int] | None:
    """Each class folder's index in the ImageNet class list of a ``num_classes``-way head.

    None unless every folder is a wnid and ``num_classes`` is the size of one of
    timm's ImageNet class lists (1000 for ImageNet-1k).
    """
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None or not all(_WNID.fullmatch(c) for c in dataset.classes):
        return None
    index = {wnid: i for i, wnid in enumerate(ImageNetInfo(subset).label_names())}
    unknown = [c for c in dataset.classes if c not in index]
    if unknown:
        raise HybridQuantError(
            f"class folders {unknown[:3]} of {dataset.root} are not {subset} wnids "
            f"({len(unknown)} of {len(dataset.classes)} unknown), the classes of the model's {num_classes} outputs"
        )
    return {c: index[c] for c in dataset.classes}


def check_class_names(dataset: ImageFolder, class_names: Sequence[str] | None, num_classes: int) -> None:
    """Fail when the model's classes cannot be the dataset's classes.

    A model without class names whose head is an ImageNet classifier (1000
    outputs for ImageNet-1k) and a dataset whose class folders are ImageNet
    wnids (``n01440764``, ...) are matched by wnid: each image is relabelled
    with its class's index in timm's ImageNet class list, so a folder holding
    only some of the classes is labelled right (ImageFolder numbers whatever
    folders are present 0..k-1).
    """
    if class_names is None:
        labels = _imagenet_labels(dataset, num_classes)
        if labels is not None:
            # map through class_to_idx (not the folder order) so a second check leaves the labels as they are
            folder_of = {i: c for c, i in dataset.class_to_idx.items()}
            dataset.class_to_idx = labels
            dataset.samples = [(path, labels[folder_of[t]]) for path, t in dataset.samples]
            dataset.imgs = dataset.samples
            dataset.targets = [t for _, t in dataset.samples]
            return
    if class_names is not None and list(class_names) != list(dataset.classes):
        raise HybridQuantError(
            f"the model's class names {list(class_names)[:4]}... do not match the "
            f"dataset's class folders {dataset.classes[:4]}..."
        )
    if num_classes != len(dataset.classes):
        raise HybridQuantError(
            f"the model has {num_classes} classes but {dataset.root} has {len(dataset.classes)}"
        )


@dataclass(frozen=True)
class DataOverrides:
    """User overrides of the model's preprocessing (``None`` keeps the model's)."""

    img_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    def as_cfg(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        if self.img_size is not None:
            cfg["input_size"] = (3, self.img_size, self.img_size)
        for key in ("mean", "std", "interpolation", "crop_pct"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        return cfg


def data_config(model_cfg: dict[str, Any], overrides: DataOverrides | None = None) -> dict[str, Any]:
    """Resolve the eval preprocessing: the model's data config, then user overrides."""
    args = dict(model_cfg)
    args.update((overrides or DataOverrides()).as_cfg())
    return resolve_data_config(args=args, use_test_size=True)


def eval_transform(cfg: dict[str, Any]):
    """timm's eval transform (resize, center crop, normalize) for ``cfg``."""
    return create_transform(**cfg, is_training=False)


class PixelTransform:
    """The eval transform up to the uint8 image (resize, center crop): an (H, W, C) uint8 array. This is what the
    exported C program reads; its input table does the rest (``ToTensor``'s ``/ 255``, ``Normalize``)."""

    def __init__(self, cfg: dict[str, Any]):
        steps = list(eval_transform(cfg).transforms)
        tail = [type(s).__name__ for s in steps[-2:]]
        if len(steps) < 2 or tail[0] not in ("ToTensor", "MaybeToTensor") or tail[1] != "Normalize":
            raise HybridQuantError(f"the eval preprocessing does not end in ToTensor, Normalize ({tail}): no uint8 "
                                   "image to give the C program")
        self.resize_crop = T.Compose(steps[:-2])

    def __call__(self, img) -> np.ndarray:
        return np.array(self.resize_crop(img.convert("RGB")), dtype=np.uint8)  # writable: torch takes it


def train_transform(cfg: dict[str, Any]):
    """Small-data augmentation: resize, padded random crop, horizontal flip."""
    size = cfg["input_size"][-1]
    interp = T.InterpolationMode(cfg.get("interpolation", "bilinear"))
    return T.Compose(
        [
            T.Resize((size, size), interpolation=interp),
            T.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


def balanced_subset(dataset: ImageFolder, limit: int | None) -> Dataset:
    """A deterministic, class-balanced subset of ``limit`` images (all when ``None``).

    Images are taken round-robin over classes in file order, so every class
    gets ``limit // num_classes`` images or one more.
    """
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise HybridQuantError(f"--limit must be positive, got {limit}")
    rank: dict[int, int] = {}
    keyed = []
    for idx, target in enumerate(dataset.targets):
        r = rank.get(target, 0)
        rank[target] = r + 1
        keyed.append((r, target, idx))
    keyed.sort()
    return Subset(dataset, sorted(idx for _, _, idx in keyed[:limit]))


def random_subset(dataset: Dataset, count: int, seed: int) -> Subset:
    """``count`` images drawn without replacement with a seeded generator."""
    if count > len(dataset):
        raise HybridQuantError(
            f"asked for {count} calibration images but the train split has {len(dataset)}"
        )
    if count <= 0:
        raise HybridQuantError(f"the number of calibration images must be positive, got {count}")
    indices = random.Random(seed).sample(range(len(dataset)), count)
    return Subset(dataset, sorted(indices))


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with a seeded shuffle, so runs are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0 and shuffle,
        drop_last=shuffle,
    )


def channel_stats(dataset: ImageFolder, count: int = 5000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixel values in [0, 1] over a seeded sample."""
    idx = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
    to_tensor = T.ToTensor()
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    for i in idx:
        x = to_tensor(dataset.loader(dataset.samples[i][0])).double().flatten(1)
        s += x.sum(1)
        s2 += (x * x).sum(1)
        n += x.shape[1]
    mean = s / n
    std = (s2 / n - mean * mean).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())

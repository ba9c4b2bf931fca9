"""ImageFolder data: split detection, subsets, preprocessing, unreadable images."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hybridquant.data import (
    DataOverrides,
    balanced_subset,
    channel_stats,
    check_class_names,
    data_config,
    eval_transform,
    image_folder,
    load_image,
    make_loader,
    random_subset,
    split_dir,
    train_transform,
)
from hybridquant.errors import HybridQuantError
from tests.conftest import CLASSES, TEST_COUNTS, TRAIN_COUNTS, pretrained_cfg, write_images


class FakeFolder:
    """Just enough of an ImageFolder for the subset helpers."""

    def __init__(self, targets):
        self.targets = list(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i, self.targets[i]


# --------------------------------------------------------------------------- splits


def test_split_detection_test_then_val(data_dir):
    assert split_dir(data_dir, "eval") == data_dir / "test"
    assert split_dir(data_dir, "train") == data_dir / "train"
    (data_dir / "val").mkdir()
    assert split_dir(data_dir, "eval") == data_dir / "val"  # val wins over test


def test_missing_splits(tmp_path, data_dir):
    with pytest.raises(HybridQuantError, match="data folder not found"):
        split_dir(tmp_path / "nowhere", "eval")
    (data_dir / "test").rename(data_dir / "testing")
    with pytest.raises(HybridQuantError, match="has no 'val/' or 'test/' split"):
        split_dir(data_dir, "eval")
    (data_dir / "train").rename(data_dir / "training")
    with pytest.raises(HybridQuantError, match="has no 'train/' split"):
        split_dir(data_dir, "train")


def test_split_that_is_a_file_is_not_a_split(data_dir):
    import shutil

    shutil.rmtree(data_dir / "test")
    (data_dir / "test").write_text("oops")
    with pytest.raises(HybridQuantError, match="has no 'val/' or 'test/' split"):
        split_dir(data_dir, "eval")


def test_image_folder_reads_classes_and_counts(data_dir):
    ds = image_folder(data_dir, "eval")
    assert ds.classes == CLASSES
    assert Counter(ds.targets) == {i: TEST_COUNTS[c] for i, c in enumerate(CLASSES)}
    assert len(image_folder(data_dir, "train")) == sum(TRAIN_COUNTS.values())


def test_image_folder_without_images(data_dir):
    for img in (data_dir / "test").rglob("*.jpg"):
        img.unlink()
    with pytest.raises(HybridQuantError, match="no images in"):
        image_folder(data_dir, "eval")
    for sub in (data_dir / "test").iterdir():
        sub.rmdir()
    with pytest.raises(HybridQuantError, match="no images in"):
        image_folder(data_dir, "eval")


def test_other_image_formats(tmp_path):
    write_images(tmp_path / "d" / "train", {"x": 1, "y": 1}, seed=0, ext=".png")
    write_images(tmp_path / "d" / "val", {"x": 1, "y": 1}, seed=1, ext=".png")
    assert len(image_folder(tmp_path / "d", "eval")) == 2


# --------------------------------------------------------------------------- unreadable images


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 7), 128).save(path)
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (5, 7)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_unreadable_image_error(tmp_path, content):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(HybridQuantError, match=f"cannot read image {bad}"):
        load_image(str(bad))


def test_unreadable_image_inside_a_dataset(data_dir):
    bad = data_dir / "test" / "ant" / "img_000.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = image_folder(data_dir, "eval", eval_transform(data_config(pretrained_cfg())))
    with pytest.raises(HybridQuantError, match=f"cannot read image {bad}"):
        ds[0]
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 0


def test_unreadable_image_through_a_worker(data_dir):
    """The worker re-raises the user error; its text still names the image."""
    bad = data_dir / "test" / "ant" / "img_000.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = image_folder(data_dir, "eval", eval_transform(data_config(pretrained_cfg())))
    with pytest.raises(HybridQuantError, match="cannot read image"):
        list(make_loader(ds, batch_size=4, workers=1))


# --------------------------------------------------------------------------- class names


def test_check_class_names(data_dir):
    ds = image_folder(data_dir, "eval")
    check_class_names(ds, None, 3)
    check_class_names(ds, list(CLASSES), 3)
    with pytest.raises(HybridQuantError, match="do not match"):
        check_class_names(ds, ["ant", "bee", "dog"], 3)
    with pytest.raises(HybridQuantError, match="the model has 10 classes"):
        check_class_names(ds, None, 10)


#: wnid folders and their indices in timm's ImageNet-1k class list (tench, Chihuahua, toilet tissue)
WNIDS = {"n01440764": 0, "n02085620": 151, "n15075141": 999}


def test_imagenet_wnid_folders_get_the_imagenet_indices(tmp_path):
    write_images(tmp_path / "d" / "val", {wnid: 2 for wnid in WNIDS}, seed=0)
    ds = image_folder(tmp_path / "d", "eval", eval_transform(data_config(pretrained_cfg())))
    assert sorted(set(ds.targets)) == [0, 1, 2]  # ImageFolder numbers the folders it finds
    check_class_names(ds, None, 1000)
    assert ds.class_to_idx == WNIDS
    expected = sorted(WNIDS.values())
    assert sorted(set(ds.targets)) == expected and [t for _, t in ds.samples] == ds.targets
    assert sorted(y for _, y in ds) == [i for i in expected for _ in range(2)]  # what a loader yields
    check_class_names(ds, None, 1000)  # checking again keeps the labels
    assert ds.class_to_idx == WNIDS and sorted(set(ds.targets)) == expected


def test_wnid_folders_outside_imagenet(tmp_path):
    write_images(tmp_path / "d" / "val", {"n01440764": 1, "n00000001": 1}, seed=0)
    ds = image_folder(tmp_path / "d", "eval")
    with pytest.raises(HybridQuantError, match=r"class folders \['n00000001'\] of .* are not imagenet-1k wnids"):
        check_class_names(ds, None, 1000)
    # a head that is not an ImageNet classifier keeps ImageFolder's labels
    check_class_names(ds, None, 2)
    assert ds.targets == [0, 1]
    # as does a model that names its classes
    with pytest.raises(HybridQuantError, match="do not match"):
        check_class_names(ds, ["n01440764", "n00000001"], 2)


# --------------------------------------------------------------------------- subsets


def test_balanced_subset_properties():
    ds = FakeFolder([0] * 10 + [1] * 2 + [2] * 7)
    for limit in range(1, len(ds)):
        sub = balanced_subset(ds, limit)
        assert len(sub) == limit
        assert sub.indices == sorted(set(sub.indices))
        counts = Counter(ds.targets[i] for i in sub.indices)
        # each class gets limit // k or one more, unless it runs out of images
        for c, available in Counter(ds.targets).items():
            assert counts[c] <= available
            if counts[c] < available:
                assert counts[c] >= max(counts.values()) - 1
        assert balanced_subset(ds, limit).indices == sub.indices  # deterministic
    # within a class the first files in order are taken
    assert balanced_subset(ds, 3).indices == [0, 10, 12]


def test_balanced_subset_grows_monotonically():
    ds = FakeFolder([i % 4 for i in range(23)])
    prev: set[int] = set()
    for limit in range(1, 23):
        cur = set(balanced_subset(ds, limit).indices)
        assert prev <= cur
        prev = cur


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=60),
    st.integers(min_value=1, max_value=70),
)
def test_balanced_subset_hypothesis(targets, limit):
    ds = FakeFolder(targets)
    sub = balanced_subset(ds, limit)
    n = min(limit, len(ds))
    assert len(sub) == n
    counts = (
        Counter(ds.targets[i] for i in range(len(ds)))
        if sub is ds
        else Counter(ds.targets[i] for i in sub.indices)
    )
    available = Counter(targets)
    not_exhausted = [counts[c] for c in available if counts[c] < available[c]]
    if not_exhausted:
        assert max(counts.values()) - min(not_exhausted) <= 1


def test_balanced_subset_all_and_errors(data_dir):
    ds = image_folder(data_dir, "eval")
    assert balanced_subset(ds, None) is ds
    assert balanced_subset(ds, len(ds)) is ds
    assert balanced_subset(ds, len(ds) + 5) is ds
    for bad in (0, -3):
        with pytest.raises(HybridQuantError, match="--limit must be positive"):
            balanced_subset(ds, bad)


def test_random_subset_is_seeded():
    ds = FakeFolder(range(50))
    a = random_subset(ds, 10, seed=3)
    assert a.indices == random_subset(ds, 10, seed=3).indices
    assert a.indices == sorted(set(a.indices)) and len(a) == 10
    assert a.indices != random_subset(ds, 10, seed=4).indices
    assert sorted(random_subset(ds, 50, seed=0).indices) == list(range(50))


@pytest.mark.parametrize(
    ("count", "needle"),
    [(51, "asked for 51 calibration images"), (0, "must be positive"), (-1, "must be positive")],
)
def test_random_subset_errors(count, needle):
    with pytest.raises(HybridQuantError, match=needle):
        random_subset(FakeFolder(range(50)), count, seed=0)


# --------------------------------------------------------------------------- preprocessing


def test_data_config_from_model_and_overrides():
    cfg = data_config(pretrained_cfg())
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    cfg = data_config(pretrained_cfg(), DataOverrides(img_size=48, mean=(0.1, 0.2, 0.3), crop_pct=0.5))
    assert (
        cfg["input_size"] == (3, 48, 48) and tuple(cfg["mean"]) == (0.1, 0.2, 0.3) and cfg["crop_pct"] == 0.5
    )
    assert tuple(cfg["std"]) == (0.25, 0.25, 0.25)


def test_eval_and_train_transforms(tmp_path):
    img = Image.new("RGB", (32, 32), (255, 0, 128))
    cfg = data_config(pretrained_cfg(), DataOverrides(img_size=64))
    x = eval_transform(cfg)(img)
    assert x.shape == (3, 64, 64)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - 0.5) / 0.25
    assert torch.allclose(x[:, 10, 10], expected, atol=1e-5)
    torch.manual_seed(0)
    assert train_transform(cfg)(img).shape == (3, 64, 64)


def test_channel_stats_of_solid_images(tmp_path):
    for cls, colour in (("a", (0, 0, 0)), ("b", (255, 255, 255))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), colour).save(tmp_path / "train" / cls / f"{i}.png")
    mean, std = channel_stats(image_folder(tmp_path, "train"))
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)


def test_loader_keeps_order_without_shuffle():
    ds = FakeFolder(range(10))
    xs = torch.cat([x for x, _ in make_loader(ds, batch_size=3, workers=0)])
    assert xs.tolist() == list(range(10))

"""Model loading: checkpoint forms, classifier size, class names, hub and bundled models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hybridquant import models
from hybridquant.errors import HybridQuantError
from hybridquant.models import list_bundled, load_model, read_checkpoint
from tests.conftest import ARCH, CLASSES, IMG, MEAN, STD, TEST_COUNTS, make_state_dict, pretrained_cfg
from tests.test_cli import assert_user_error, eval_args, run


def logits(loaded, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return loaded.model(x)


def test_plain_state_dict_and_dict_checkpoint_agree(save_ckpt, state_dict):
    plain = load_model(ARCH, save_ckpt("plain.pt", obj=state_dict))
    full = load_model(ARCH, save_ckpt("full.pt", class_names=list(CLASSES), model=ARCH))
    assert plain.num_classes == full.num_classes == len(CLASSES)
    assert torch.equal(logits(plain), logits(full))
    assert not plain.model.training  # eval mode
    assert plain.class_names is None and full.class_names == CLASSES
    # the plain state_dict keeps timm's own data config; the dict carries ours
    assert full.data_cfg["input_size"] == (3, IMG, IMG)
    assert full.data_cfg["mean"] == tuple(MEAN) and full.data_cfg["std"] == tuple(STD)
    assert full.data_cfg["interpolation"] == "bilinear" and full.data_cfg["crop_pct"] == 1.0
    assert plain.data_cfg["input_size"] == (3, 256, 256)


def test_read_checkpoint_canonical_form(save_ckpt, state_dict):
    ckpt = read_checkpoint(save_ckpt("plain.pt", obj=state_dict))
    assert set(ckpt) == {"state_dict"} and ckpt["state_dict"].keys() == state_dict.keys()
    ckpt = read_checkpoint(save_ckpt("full.pt", num_classes=3))
    assert ckpt["num_classes"] == 3 and "pretrained_cfg" in ckpt


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_keys_are_stripped_and_classes_inferred(save_ckpt, state_dict, prefix):
    reference = load_model(ARCH, save_ckpt("ref.pt", obj=state_dict))
    prefixed = {prefix + k: v for k, v in state_dict.items()}
    for obj in (prefixed, {"state_dict": prefixed}):
        loaded = load_model(ARCH, save_ckpt("prefixed.pt", obj=obj))
        assert loaded.num_classes == len(CLASSES)
        assert torch.equal(logits(loaded), logits(reference))


@pytest.mark.parametrize("num_classes", [2, 5, 10])
def test_num_classes_comes_from_the_checkpoint(save_ckpt, num_classes):
    sd = make_state_dict(num_classes=num_classes)
    loaded = load_model(ARCH, save_ckpt("n.pt", obj=sd), num_classes=999)  # the checkpoint wins
    assert loaded.num_classes == num_classes
    assert logits(loaded).shape == (2, num_classes)


def test_num_classes_argument_without_checkpoint():
    assert load_model(ARCH, num_classes=4).num_classes == 4
    assert load_model(ARCH).source == "random-init"


def test_class_names_length_mismatch(save_ckpt):
    with pytest.raises(HybridQuantError, match="lists 4 class names for a 3-way classifier"):
        load_model(ARCH, save_ckpt(class_names=["a", "b", "c", "d"]))


def test_checkpoint_for_other_model_name(save_ckpt):
    with pytest.raises(HybridQuantError, match="was saved for model 'mobilevit_s'"):
        load_model(ARCH, save_ckpt(model="mobilevit_s"))


def test_checkpoint_that_does_not_fit(save_ckpt, state_dict):
    broken = dict(state_dict)
    broken.pop(next(iter(broken)))
    with pytest.raises(HybridQuantError, match="does not fit model 'mobilevit_xxs'"):
        load_model(ARCH, save_ckpt("broken.pt", obj=broken))


@pytest.mark.parametrize(
    "obj", [[1, 2], {}, {"a": 1}, {"state_dict": [1, 2]}], ids=["list", "empty", "mixed", "sd-list"]
)
def test_checkpoint_of_the_wrong_shape(save_ckpt, obj):
    with pytest.raises(HybridQuantError, match="checkpoint"):
        load_model(ARCH, save_ckpt("odd.pt", obj=obj))


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(HybridQuantError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    for content in (b"\x00\x01garbage", b"\x80\x02garbage here", b""):  # the second: torch's weights_only advice
        bad.write_bytes(content)
        with pytest.raises(HybridQuantError) as info:
            read_checkpoint(bad)
        assert str(info.value) == f"cannot read checkpoint {bad}: not a valid or complete torch.save file"
    with pytest.raises(HybridQuantError, match=f"checkpoint {tmp_path} is a directory, not a file"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["resnet_999", "mobilevit_xxs.no_such_tag", "mobilevit_xxs.no_such_dataset"])
def test_unknown_model_names(name, save_ckpt):
    with pytest.raises(HybridQuantError, match=f"unknown model '{name}'"):
        load_model(name)
    with pytest.raises(HybridQuantError, match=f"unknown model '{name}'"):
        load_model(name, save_ckpt())


def test_known_pretrained_tag_is_accepted(save_ckpt):
    assert load_model(f"{ARCH}.cvnets_in1k", save_ckpt()).num_classes == len(CLASSES)


def test_pretrained_offline_gives_a_clear_error(hub_offline):
    with pytest.raises(HybridQuantError) as info:
        load_model(ARCH, pretrained=True)
    message = str(info.value)
    assert f"cannot fetch pretrained weights for '{ARCH}' from the timm hub" in message
    assert "--checkpoint" in message and "\n" not in message


def test_bundled_models(monkeypatch, tmp_path, state_dict):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(models, "bundled_dir", lambda: bundled)
    assert list_bundled() == []
    torch.save(
        {
            "model": ARCH,
            "state_dict": state_dict,
            "class_names": list(CLASSES),
            "pretrained_cfg": pretrained_cfg(),
        },
        bundled / f"{ARCH}.toy.pt",
    )
    (bundled / "README.md").write_text("not a model")
    assert list_bundled() == [f"{ARCH}.toy"]
    loaded = load_model(f"{ARCH}.toy")
    assert loaded.name == ARCH and loaded.source == f"bundled:{ARCH}.toy"
    assert loaded.class_names == CLASSES and loaded.data_cfg["input_size"] == (3, IMG, IMG)
    with pytest.raises(HybridQuantError, match="bundled model; do not pass --checkpoint"):
        load_model(f"{ARCH}.toy", checkpoint=bundled / f"{ARCH}.toy.pt")
    with pytest.raises(HybridQuantError, match="bundled model; do not pass --weights"):
        load_model(f"{ARCH}.toy", pretrained=bundled / f"{ARCH}.toy.pt")


def test_bundled_checkpoint_without_model_key_uses_the_name(monkeypatch, tmp_path, state_dict):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(models, "bundled_dir", lambda: bundled)
    torch.save({"state_dict": state_dict}, bundled / f"{ARCH}.other.pt")
    assert load_model(f"{ARCH}.other").name == ARCH


def test_shipped_bundled_models_load():
    """Whatever the package ships must load and carry class names and a data config."""
    for name in list_bundled():
        loaded = load_model(name)
        assert loaded.class_names and len(loaded.class_names) == loaded.num_classes
        assert {"input_size", "mean", "std"} <= loaded.data_cfg.keys()


# --------------------------------------------------------------------------- hub weights from a local file

HUB_CLASSES = 10  # neither timm's default head (1000) nor the test data's (3): the file must set it


def write_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """Save ``state_dict`` as the hub stores it: safetensors for ``*.safetensors``, else torch.save."""
    if path.suffix == ".safetensors":
        pytest.importorskip("safetensors.torch").save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def hub_state_dict() -> dict[str, torch.Tensor]:
    return make_state_dict(num_classes=HUB_CLASSES, seed=1)


def assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: str = "") -> None:
    state = model.state_dict()
    checked = [k for k in expected if not (skip and k.startswith(skip))]
    assert checked and all(torch.equal(state[k], expected[k]) for k in checked)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_weights_file_loads_like_hub_weights(tmp_path, hub_offline, hub_state_dict, filename):
    path = write_weights(tmp_path / filename, hub_state_dict)
    loaded = load_model(ARCH, pretrained=path)
    assert loaded.source == f"weights-file:{path}" and loaded.num_classes == HUB_CLASSES
    assert loaded.model.pretrained_cfg["file"] == str(path)  # timm's own pretrained loading read it
    assert loaded.model.state_dict().keys() == hub_state_dict.keys()
    assert_weights(loaded.model, hub_state_dict)
    assert loaded.data_cfg["input_size"] == (3, 256, 256)  # the preprocessing of timm's pretrained_cfg
    # the same model without the file is randomly initialised: the equality above is the file's doing
    torch.manual_seed(0)
    random_init = load_model(ARCH, num_classes=HUB_CLASSES).model.state_dict()
    assert not torch.equal(random_init["head.fc.weight"], hub_state_dict["head.fc.weight"])
    assert not torch.equal(random_init["stem.conv.weight"], hub_state_dict["stem.conv.weight"])


def test_weights_file_with_a_tag_and_another_head(tmp_path, hub_offline, hub_state_dict):
    path = write_weights(tmp_path / "pytorch_model.bin", hub_state_dict)
    assert load_model(f"{ARCH}.cvnets_in1k", pretrained=path).num_classes == HUB_CLASSES
    # asking for another head: timm keeps the backbone and initialises the classifier, as with hub weights
    loaded = load_model(ARCH, pretrained=path, num_classes=len(CLASSES))
    assert loaded.num_classes == len(CLASSES)
    assert_weights(loaded.model, hub_state_dict, skip="head.fc.")


def test_weights_file_errors(tmp_path, hub_state_dict, ckpt_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(HybridQuantError, match=f"^weights file not found: {missing}$"):
        load_model(ARCH, pretrained=missing)
    with pytest.raises(HybridQuantError, match="is a directory, not a file"):
        load_model(ARCH, pretrained=tmp_path)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00\x01garbage")
    with pytest.raises(HybridQuantError) as info:
        load_model(ARCH, pretrained=garbage)
    assert str(info.value) == f"cannot read weights file {garbage}: not a valid or complete safetensors file"
    blob = tmp_path / "blob"  # the hub cache's name for a file: the suffix that tells the format is gone
    shutil.copy(write_weights(tmp_path / "good.safetensors", hub_state_dict), blob)
    with pytest.raises(HybridQuantError, match=r"must be named \*\.safetensors"):
        load_model(ARCH, pretrained=blob)
    broken = dict(hub_state_dict)
    broken.pop("stem.conv.weight")
    with pytest.raises(HybridQuantError, match=f"weights file .* does not fit model '{ARCH}': Missing key"):
        load_model(ARCH, pretrained=write_weights(tmp_path / "broken.bin", broken))
    with pytest.raises(HybridQuantError, match="pass either --checkpoint or --weights, not both"):
        load_model(ARCH, ckpt_path, pretrained=blob)


def test_cli_eval_with_weights_file(capsys, tmp_path, data_dir, hub_offline, state_dict):
    path = write_weights(tmp_path / "pytorch_model.bin", state_dict)  # the data's 3 classes
    rc, out, err = run(capsys, *eval_args(data_dir, None, "--weights", str(path), "--img-size", "32"))
    assert rc == 0, err  # --weights alone: it implies --pretrained
    result = json.loads(out)
    assert result["source"] == f"weights-file:{path}" and result["images"] == sum(TEST_COUNTS.values())


def test_cli_weights_errors(capsys, tmp_path, data_dir, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    missing = tmp_path / "model.safetensors"
    rc, _, err = run(capsys, *eval_args(data_dir, None, "--weights", str(missing), "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"weights file not found: {missing}", out_dir)
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--weights", str(ckpt_path)))
    assert_user_error(rc, err, "pass either --checkpoint or --weights, not both")
    rc, _, err = run(capsys, *eval_args(data_dir, None, "--weights", ""))  # an unset variable: no random weights
    assert_user_error(rc, err, "weights file . is a directory, not a file")


def test_img_size_builds_the_attention_biases_for_it(tmp_path):
    """EfficientFormerV2 sizes its attention biases by the input: load_model builds it for img_size, and a
    checkpoint's input size is the default; a model class without the argument (FastViT) ignores it."""
    import timm

    loaded = load_model("efficientformerv2_s0", num_classes=3, img_size=64)
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    path = tmp_path / "effv2.pt"
    torch.save({"model": "efficientformerv2_s0", "state_dict": loaded.model.state_dict(), "num_classes": 3,
                "class_names": ["a", "b", "c"], "pretrained_cfg": {"input_size": [3, 64, 64]}}, path)
    again = load_model("efficientformerv2_s0", path)  # loads strictly
    assert again.data_cfg["input_size"] == (3, 64, 64)
    assert again.num_classes == 3  # two heads (get_classifier() is a pair), their outputs averaged
    with pytest.raises(RuntimeError):  # the default (224) biases do not run at 64
        timm.create_model("efficientformerv2_s0", num_classes=3).eval()(torch.zeros(1, 3, 64, 64))
    assert load_model("fastvit_t8", num_classes=3, img_size=64).num_classes == 3

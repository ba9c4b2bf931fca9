"""The ``hybridquant`` command line: eval results, and every user error of issue 2 item 7.

Each error must give a one-line message naming the problem, exit code 2, no
traceback and no output file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridquant.cli import main
from tests.conftest import ARCH, CLASSES, TEST_COUNTS, make_state_dict, pretrained_cfg

RESULT_KEYS = {"top1", "top5", "images", "seconds", "images_per_s"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def visible_lines(err: str) -> list[str]:
    """What a terminal shows: per line, the text after the last carriage return."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n")]
    return [line for line in lines if line]


def eval_args(data: Path, ckpt: Path | None, *extra: str, model: str = ARCH) -> list[str]:
    args = [
        "eval",
        "--model",
        model,
        "--data",
        str(data),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]
    if ckpt is not None:
        args += ["--checkpoint", str(ckpt)]
    return args + list(extra)


def assert_user_error(
    rc: int, err: str, needle: str, out_dir: Path | None = None, command: str = "eval"
) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = visible_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"hybridquant {command}: error: "), lines[0]
    assert needle in lines[0], lines[0]
    if out_dir is not None:
        assert list(out_dir.iterdir()) == [], "a failed run left files behind"
    return lines[0]


# --------------------------------------------------------------------------- happy path


def test_eval_writes_json_with_required_keys(capsys, tmp_path, data_dir, ckpt_path):
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()  # --out's folder must exist
    rc, stdout, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out)))
    assert rc == 0, err
    written = json.loads(out.read_text())
    printed = json.loads(stdout)
    assert written == printed
    assert RESULT_KEYS <= written.keys()
    assert written["images"] == sum(TEST_COUNTS.values())
    assert 0.0 <= written["top1"] <= written["top5"] <= 1.0
    assert written["top5"] == 1.0  # 3 classes: the top-5 always holds the label
    assert written["seconds"] >= 0 and written["images_per_s"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]  # no temp file left


def test_eval_prefers_val_over_test(capsys, tmp_path, data_dir, ckpt_path):
    from tests.conftest import write_images

    write_images(data_dir / "val", {c: 1 for c in CLASSES}, seed=9)
    rc, stdout, err = run(capsys, *eval_args(data_dir, ckpt_path))
    assert rc == 0, err
    assert json.loads(stdout)["images"] == len(CLASSES)


def test_eval_limit_counts_images(capsys, data_dir, ckpt_path):
    rc, stdout, err = run(capsys, *eval_args(data_dir, ckpt_path, "--limit", "6"))
    assert rc == 0, err
    assert json.loads(stdout)["images"] == 6
    # a limit above the split size evaluates everything
    rc, stdout, _ = run(capsys, *eval_args(data_dir, ckpt_path, "--limit", "1000"))
    assert rc == 0 and json.loads(stdout)["images"] == sum(TEST_COUNTS.values())


def test_eval_limit_is_balanced_and_deterministic(capsys, monkeypatch, data_dir, ckpt_path):
    seen: list[list[int]] = []
    from hybridquant import data as data_mod

    original = data_mod.balanced_subset

    def spy(dataset, limit):
        subset = original(dataset, limit)
        seen.append([dataset.targets[i] for i in subset.indices])
        return subset

    monkeypatch.setattr(data_mod, "balanced_subset", spy)
    for _ in range(2):
        rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--limit", "7"))
        assert rc == 0, err
    assert len(seen) == 2 and seen[0] == seen[1]
    counts = [seen[0].count(c) for c in range(len(CLASSES))]
    assert sum(counts) == 7 and max(counts) - min(counts) <= 1


def test_eval_does_not_depend_on_batch_size(capsys, data_dir, ckpt_path):
    results = []
    for bs in ("1", "5", "64"):
        args = eval_args(data_dir, ckpt_path)
        args[args.index("--batch-size") + 1] = bs
        rc, stdout, err = run(capsys, *args)
        assert rc == 0, err
        results.append(json.loads(stdout))
    for r in results[1:]:
        assert r["images"] == results[0]["images"]
        assert r["top1"] == pytest.approx(results[0]["top1"], abs=1e-9)
        assert r["top5"] == pytest.approx(results[0]["top5"], abs=1e-9)


def test_eval_overwrites_out_atomically(capsys, monkeypatch, tmp_path, data_dir, ckpt_path):
    out = tmp_path / "result.json"
    out.write_text('{"old": true}\n')
    from hybridquant import _io

    class FailingReplace:  # the temp file is written, then the final rename fails
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, *args):
            raise OSError("disk full")

    # a crash while writing must keep the old file intact and leave no temp file
    monkeypatch.setattr(_io, "os", FailingReplace())
    with pytest.raises(OSError):
        main(eval_args(data_dir, ckpt_path, "--out", str(out)))
    capsys.readouterr()
    assert json.loads(out.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir() if p.name != "data"] == ["result.json"]
    monkeypatch.undo()
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out)))
    assert rc == 0, err
    assert RESULT_KEYS <= json.loads(out.read_text()).keys()


def test_eval_bundled_model_by_name(capsys, monkeypatch, tmp_path, data_dir, state_dict):
    from hybridquant import models

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    torch.save(
        {
            "model": ARCH,
            "state_dict": state_dict,
            "class_names": list(CLASSES),
            "pretrained_cfg": pretrained_cfg(),
        },
        bundled / f"{ARCH}.toy.pt",
    )
    monkeypatch.setattr(models, "bundled_dir", lambda: bundled)
    rc, stdout, err = run(capsys, *eval_args(data_dir, None, model=f"{ARCH}.toy"))
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["source"] == f"bundled:{ARCH}.toy" and result["images"] == sum(TEST_COUNTS.values())


def test_eval_overrides_are_accepted(capsys, data_dir, ckpt_path):
    rc, stdout, err = run(
        capsys,
        *eval_args(
            data_dir,
            ckpt_path,
            "--img-size",
            "48",
            "--mean",
            "0.4,0.4,0.4",
            "--std",
            "0.2 0.2 0.2",
            "--interpolation",
            "bicubic",
            "--crop-pct",
            "0.875",
        ),
    )
    assert rc == 0, err
    assert json.loads(stdout)["images"] == sum(TEST_COUNTS.values())


# --------------------------------------------------------------------------- item 7 errors


def test_error_unknown_model(capsys, tmp_path, data_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = run(
        capsys, *eval_args(data_dir, None, "--out", str(out_dir / "r.json"), model="mobilevit_xxx")
    )
    line = assert_user_error(rc, err, "unknown model 'mobilevit_xxx'", out_dir)
    assert "did you mean" in line and "mobilevit_xxs" in line


@pytest.mark.parametrize("name", ["no_such_net", "mobilevit_xxs.no_such_dataset"])
def test_error_unknown_model_with_checkpoint(capsys, tmp_path, data_dir, ckpt_path, name):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json"), model=name))
    assert_user_error(rc, err, f"unknown model '{name}'", out_dir)


def test_error_missing_model_argument(capsys, data_dir):
    rc, _, err = run(capsys, "eval", "--data", str(data_dir), "--workers", "0")
    assert_user_error(rc, err, "--model")


def test_error_missing_checkpoint(capsys, tmp_path, data_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    missing = tmp_path / "nope.pt"
    rc, _, err = run(capsys, *eval_args(data_dir, missing, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"checkpoint not found: {missing}", out_dir)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b"", b"PK\x03\x04" + b"\x00" * 64, b"\x80\x02garbage here", b'{"a": 1}'],
    ids=["text", "empty", "broken-zip", "bad-pickle", "json"],
)
def test_error_corrupt_checkpoint(capsys, tmp_path, data_dir, content):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    rc, _, err = run(capsys, *eval_args(data_dir, bad, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"cannot read checkpoint {bad}: not a valid or complete torch.save file", out_dir)
    assert "weights_only" not in err and "Weights only" not in err  # none of torch's advice


def test_error_truncated_checkpoint(capsys, tmp_path, data_dir, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = tmp_path / "truncated.pt"
    data = ckpt_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rc, _, err = run(capsys, *eval_args(data_dir, bad, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"cannot read checkpoint {bad}: not a valid or complete torch.save file", out_dir)


def test_error_checkpoint_with_pickled_objects(capsys, tmp_path, data_dir, state_dict):
    import argparse

    bad = tmp_path / "objects.pt"
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=1)}, bad)
    rc, _, err = run(capsys, *eval_args(data_dir, bad))
    line = assert_user_error(rc, err, f"cannot read checkpoint {bad}: it stores Python objects")
    assert "argparse.Namespace" in line and "add_safe_globals" not in line


def test_debug_keeps_the_traceback_of_a_corrupt_checkpoint(capsys, tmp_path, data_dir):
    from hybridquant.errors import HybridQuantError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage here")
    with pytest.raises(HybridQuantError, match="not a valid or complete torch.save file") as info:
        main(eval_args(data_dir, bad, "--debug"))
    assert info.value.__cause__ is not None  # torch's own error stays chained for --debug


def test_error_checkpoint_not_a_state_dict(capsys, tmp_path, data_dir, save_ckpt):
    bad = save_ckpt("list.pt", obj=[1, 2, 3])
    rc, _, err = run(capsys, *eval_args(data_dir, bad))
    assert_user_error(rc, err, "neither a state_dict nor a dict with key 'state_dict'")


def test_error_checkpoint_for_another_architecture(capsys, tmp_path, data_dir, save_ckpt):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ckpt = save_ckpt("plain.pt", obj=make_state_dict(arch="resnet10t"))
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"checkpoint {ckpt} does not fit model '{ARCH}'", out_dir)


def test_error_checkpoint_saved_for_other_model(capsys, data_dir, save_ckpt):
    ckpt = save_ckpt(model="mobilevit_xs")
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt))
    assert_user_error(rc, err, "was saved for model 'mobilevit_xs', not 'mobilevit_xxs'")


def test_error_classifier_size_mismatch(capsys, tmp_path, data_dir, save_ckpt):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ckpt = save_ckpt(
        "five.pt", obj={"state_dict": make_state_dict(num_classes=5), "pretrained_cfg": pretrained_cfg()}
    )
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"the model has 5 classes but {data_dir / 'test'} has 3", out_dir)


def test_error_num_classes_key_disagrees_with_weights(capsys, data_dir, save_ckpt):
    ckpt = save_ckpt(num_classes=7)
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt))
    assert_user_error(rc, err, "does not fit model")


def test_error_class_names_mismatch(capsys, tmp_path, data_dir, save_ckpt):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ckpt = save_ckpt(class_names=["ant", "bee", "cow"])
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt, "--out", str(out_dir / "r.json")))
    line = assert_user_error(rc, err, "class names", out_dir)
    assert "do not match the dataset's class folders" in line


def test_error_class_names_in_other_order(capsys, data_dir, save_ckpt):
    ckpt = save_ckpt(class_names=["bee", "ant", "cat"])
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt))
    assert_user_error(rc, err, "do not match the dataset's class folders")


def test_error_class_names_count_vs_classifier(capsys, data_dir, save_ckpt):
    ckpt = save_ckpt(class_names=["ant", "bee"])
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt))
    assert_user_error(rc, err, "lists 2 class names for a 3-way classifier")


def test_error_data_folder_missing(capsys, tmp_path, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    missing = tmp_path / "no_data"
    rc, _, err = run(capsys, *eval_args(missing, ckpt_path, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"data folder not found: {missing}", out_dir)


def test_error_data_folder_without_eval_split(capsys, tmp_path, data_dir, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.rmtree(data_dir / "test")
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, "has no 'val/' or 'test/' split", out_dir)


def test_error_eval_split_without_class_folders(capsys, tmp_path, data_dir, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.rmtree(data_dir / "test")
    (data_dir / "test").mkdir()
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"no images in {data_dir / 'test'}", out_dir)


def test_error_eval_split_without_images(capsys, tmp_path, data_dir, ckpt_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for img in (data_dir / "test").rglob("*.jpg"):
        img.rename(img.with_suffix(".txt"))  # not an image extension
    rc, _, err = run(capsys, *eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json")))
    assert_user_error(rc, err, f"no images in {data_dir / 'test'}", out_dir)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_error_unreadable_image(capsys, tmp_path, data_dir, ckpt_path, workers):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = data_dir / "test" / "bee" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    args = eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json"))
    args[args.index("--workers") + 1] = workers
    rc, _, err = run(capsys, *args)
    assert_user_error(rc, err, f"cannot read image {bad}", out_dir)


def test_error_pretrained_offline(capsys, tmp_path, data_dir, hub_offline):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = eval_args(data_dir, None, "--pretrained", "--out", str(out_dir / "r.json"))
    rc, _, err = run(capsys, *args)
    assert_user_error(rc, err, f"cannot fetch pretrained weights for '{ARCH}' from the timm hub", out_dir)


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--limit", "0", "--limit must be positive"),
        ("--batch-size", "0", "--batch-size must be positive"),
        ("--workers", "-1", "--workers must be >= 0"),
    ],
)
def test_error_bad_numbers(capsys, tmp_path, data_dir, ckpt_path, flag, value, needle):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = eval_args(data_dir, ckpt_path, "--out", str(out_dir / "r.json"))
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    rc, _, err = run(capsys, *args)
    assert_user_error(rc, err, needle, out_dir)


def test_bad_arguments_exit_2_on_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", ARCH])  # --data is required
    assert info.value.code == 2
    lines = visible_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--data" in lines[0]


def test_debug_shows_the_traceback(capsys, data_dir, tmp_path):
    from hybridquant.errors import HybridQuantError

    with pytest.raises(HybridQuantError, match="checkpoint not found"):
        main(eval_args(data_dir, tmp_path / "nope.pt", "--debug"))


def test_error_in_train_leaves_no_checkpoint(capsys, tmp_path):
    out = tmp_path / "out" / "ckpt.pt"
    rc, _, err = run(
        capsys,
        "train",
        "--model",
        ARCH,
        "--data",
        str(tmp_path / "missing"),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--out",
        str(out),
    )
    assert_user_error(rc, err, "data folder not found", command="train")
    assert not out.exists()


# --------------------------------------------------------------------------- issue 22 item 3: paths first
# Every bad output path and input file is refused before any model, data or calibration is loaded:
# the loaders are replaced by functions that fail the test.


@pytest.fixture
def no_work(monkeypatch):
    """Make every model, data and file loader fail the test if a command reaches it."""
    from hybridquant import data, export, models, pipeline, qmodel, train
    from hybridquant.export import onnx as export_onnx

    def reached(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the command reached {name} before refusing its arguments")

        return fail

    for module, name in [(models, "load_model"), (pipeline, "load_model"), (pipeline, "prepare"),
                         (train, "train"), (qmodel, "load"), (export, "load_npz"), (export_onnx, "OnnxRunner"),
                         (data, "image_folder")]:
        monkeypatch.setattr(module, name, reached(f"{module.__name__}.{name}"))


def _unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder in which no file can be created, really tried (root ignores permissions): None if none."""
    import tempfile

    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (ro, Path("/sys")):
        if not folder.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    return None


@pytest.fixture
def unwritable(tmp_path) -> Path:
    folder = _unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder here refuses to create files")
    yield folder
    (tmp_path / "read_only").chmod(0o755)


def _cmd(command: str, data: Path, *extra: str) -> list[str]:
    """A command line of ``command`` with valid model/data options, then ``extra``."""
    base = {
        "eval": ["eval", "--model", ARCH, "--data", str(data)],
        "quantize": ["quantize", "--model", ARCH, "--data", str(data)],
        "analyze": ["analyze", "--model", ARCH, "--data", str(data)],
        "train": ["train", "--model", ARCH, "--data", str(data), "--epochs", "1"],
    }.get(command)
    return ["export", *extra] if base is None else [*base, "--workers", "0", *extra]


def _refused(capsys, argv: list[str], *needles: str) -> str:
    rc, out, err = run(capsys, *argv)
    line = assert_user_error(rc, err, needles[0], command=argv[0])
    for needle in needles[1:]:
        assert needle in line, line
    assert out == ""
    return line


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_out_dir_that_is_a_file(capsys, tmp_path, data_dir, no_work, command):
    existing = tmp_path / "taken"
    existing.write_text("x")
    _refused(capsys, _cmd(command, data_dir, "--out-dir", str(existing)), f"--out-dir {existing} is a file, not a folder")
    assert existing.read_text() == "x"


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_out_dir_under_a_file(capsys, tmp_path, data_dir, no_work, command):
    existing = tmp_path / "taken"
    existing.write_text("x")
    target = existing / "sub" / "run"
    _refused(capsys, _cmd(command, data_dir, "--out-dir", str(target)),
             f"--out-dir {target} cannot be created: {existing} is a file, not a folder")


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_out_dir_not_writable(capsys, data_dir, no_work, unwritable, command):
    for target in (unwritable, unwritable / "hq_run"):  # the folder itself, or where it would be created
        line = _refused(capsys, _cmd(command, data_dir, "--out-dir", str(target)), f"--out-dir {target} is not writable")
        assert not target.exists() or target == unwritable, line
    assert not list(unwritable.glob(".hybridquant-probe-*"))  # the probe file is gone


def test_out_dir_whose_output_name_is_a_folder(capsys, tmp_path, data_dir, no_work):
    out_dir = tmp_path / "run"
    (out_dir / "model.hq").mkdir(parents=True)
    _refused(capsys, _cmd("quantize", data_dir, "--out-dir", str(out_dir)), f"{out_dir / 'model.hq'} is a directory")


def test_out_dir_is_created_when_its_parent_is_writable(tmp_path):
    from hybridquant._io import check_out_dir

    target = tmp_path / "a" / "b"
    assert check_out_dir(target) == target
    assert not (tmp_path / "a").exists()  # checking creates nothing
    assert list(tmp_path.iterdir()) == []  # and leaves no probe file


@pytest.mark.parametrize("command", ["eval", "train", "export"])
def test_out_in_a_missing_folder(capsys, tmp_path, data_dir, ckpt_path, no_work, command):
    target = tmp_path / "missing" / "result.x"
    extra = ["--qmodel", str(ckpt_path)] if command == "export" else []
    _refused(capsys, _cmd(command, data_dir, *extra, "--out", str(target)),
             f"--out {target}: folder {target.parent} does not exist")
    assert not target.parent.exists()


@pytest.mark.parametrize("command", ["eval", "train", "export"])
def test_out_that_is_a_folder_or_under_a_file(capsys, tmp_path, data_dir, ckpt_path, no_work, command):
    extra = ["--qmodel", str(ckpt_path)] if command == "export" else []
    _refused(capsys, _cmd(command, data_dir, *extra, "--out", str(tmp_path)), f"--out {tmp_path} is a directory")
    target = ckpt_path / "result.x"
    _refused(capsys, _cmd(command, data_dir, *extra, "--out", str(target)),
             f"--out {target}: {ckpt_path} is a file, not a folder")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_out_in_an_unwritable_folder(capsys, data_dir, no_work, unwritable, command):
    target = unwritable / "result.x"
    _refused(capsys, _cmd(command, data_dir, "--out", str(target)), f"--out {target}: folder {unwritable} is not writable")


INPUTS = [  # (command, option, what the message calls it)
    ("eval", "--checkpoint", "checkpoint"),
    ("quantize", "--checkpoint", "checkpoint"),
    ("analyze", "--checkpoint", "checkpoint"),
    ("train", "--init-checkpoint", "checkpoint"),
    ("eval", "--qmodel", "quantized model"),
    ("export", "--qmodel", "quantized model"),
    ("eval", "--program", "integer program"),
    ("eval", "--onnx", "ONNX model"),
]


@pytest.mark.parametrize(("command", "option", "kind"), INPUTS, ids=[f"{c}{o}" for c, o, _ in INPUTS])
def test_input_file_missing_or_a_folder(capsys, tmp_path, data_dir, no_work, command, option, kind):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outputs = {"eval": ["--out", str(out_dir / "r.json")], "quantize": ["--out-dir", str(out_dir)],
               "analyze": ["--out-dir", str(out_dir)], "train": ["--out", str(out_dir / "c.pt")],
               "export": ["--out", str(out_dir / "x.npz")]}
    missing = tmp_path / "missing.file"
    argv = _cmd(command, data_dir, option, str(missing), *outputs[command])
    if command == "eval" and option != "--checkpoint":  # these options carry their own model
        del argv[1:3]
    _refused(capsys, argv, f"{kind} not found: {missing}")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    argv[argv.index(str(missing))] = str(folder)
    _refused(capsys, argv, f"{kind} {folder} is a directory, not a file")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "quantize", "analyze", "train"])
def test_missing_data_folder_before_the_model(capsys, tmp_path, no_work, command):
    missing = tmp_path / "no_data"
    extra = {"quantize": ["--out-dir", str(tmp_path / "q")], "analyze": ["--out-dir", str(tmp_path / "a")],
             "train": ["--out", str(tmp_path / "c.pt")]}.get(command, [])
    _refused(capsys, _cmd(command, missing, *extra), f"data folder not found: {missing}")


def test_corrupt_qmodel_is_one_line(capsys, tmp_path, data_dir):
    bad = tmp_path / "model.hq"
    bad.write_bytes(b"\x80\x02garbage here")
    for argv in (["eval", "--qmodel", str(bad), "--data", str(data_dir), "--workers", "0"],
                 ["export", "--qmodel", str(bad), "--out", str(tmp_path / "x.npz")]):
        _refused(capsys, argv, f"cannot read quantized model {bad}: not a valid or complete model.hq file")
        assert not (tmp_path / "x.npz").exists()


def test_corrupt_training_state_is_one_line(capsys, tmp_path, data_dir):
    out = tmp_path / "c.pt"
    state = tmp_path / "c.pt.state"
    state.write_bytes(b"PK\x03\x04 half a zip")
    argv = _cmd("train", data_dir, "--img-size", "32", "--batch-size", "4", "--out", str(out))
    _refused(capsys, argv, f"cannot read training state {state}: not a valid or complete torch.save file",
             "delete it to start over")
    assert not out.exists()


# --------------------------------------------------------------------------- console script


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("hybridquant")
    if script.exists():
        return [str(script)]
    found = shutil.which("hybridquant")
    return [found] if found else [sys.executable, "-m", "hybridquant.cli"]


def test_console_script_error_has_no_traceback(tmp_path, data_dir, ckpt_path):
    bad = data_dir / "test" / "cat" / "zz_broken.jpg"
    bad.write_bytes(b"garbage")
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*_console_script(), *eval_args(data_dir, ckpt_path, "--out", str(out))],
        capture_output=True,
        env=env,
        timeout=300,  # bytes: text mode would turn tqdm's \r into \n
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = visible_lines(stderr)
    assert len(lines) == 1 and re.match(
        r"hybridquant eval: error: cannot read image .*zz_broken\.jpg", lines[0]
    )
    assert proc.stdout == b""
    assert not out.exists()

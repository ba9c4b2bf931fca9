"""The ``hybridquant`` command line.

Every sub-command reports user errors on one line and exits with code 2
(``--debug`` shows the traceback instead). Input files, data folders and
output paths are checked before any model or data is loaded. Outputs are
written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import heap
from .errors import HybridQuantError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _floats3(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.replace(",", " ").split() if p]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers, got '{text}'")
    try:
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected three numbers, got '{text}'") from exc


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``6G``, ``512M``, ``2.5GB``, ``1.5GiB`` or ``1000000`` (bytes): K, M, G and T
    are powers of 1024, with or without ``B`` / ``iB``, in any case. An argparse type: a bad or non-positive
    size is an argument error."""
    m = _SIZE.fullmatch(text)
    # exact arithmetic: no float rounding of a byte count, no overflow on absurd ones
    size = int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]) if m else 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 6G, 512M, 2.5GB or a number of bytes, "
                                         f"got '{text}'")
    return size


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu); quantize runs only its FP32 evaluation there: calibration and the simulated model run on the CPU")
    g.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="timm name (mobilevit_xxs) or bundled model (mobilevit_xxs.cifar10)")
    g.add_argument("--checkpoint", default=None, help="torch.save file: a state_dict or a dict with 'state_dict'")
    g.add_argument("--pretrained", action="store_true", help="load timm hub weights (needs a network; see --weights)")
    # a Path, never a false value: an empty --weights "$UNSET" fails as a folder instead of meaning random weights
    g.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="the timm hub weights from a local file (the model page's model.safetensors or "
                        "pytorch_model.bin), for machines without a network; implies --pretrained")


def _add_data(p: argparse.ArgumentParser, limit: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ or test/")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    g.add_argument("--mean", type=_floats3, default=None, help="normalisation mean, three numbers")
    g.add_argument("--std", type=_floats3, default=None, help="normalisation std, three numbers")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None)
    g.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction for eval")
    if limit:
        g.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset of N images")


def _method_flags():
    """``(method, field, flag, metadata)`` of every method option that has a command-line flag, from the
    methods' config dataclasses: ``--name`` (or the field's own flag), ``--no-name`` for a switch that is on
    by default."""
    from .config import METHOD_CONFIGS

    for method, options_class in METHOD_CONFIGS.items():
        for f in dataclasses.fields(options_class):
            meta = f.metadata
            if not meta.get("cli", True):
                continue
            dashed = f.name.replace("_", "-")
            flag = meta.get("flag") or (f"--no-{dashed}" if f.default is True and "choices" not in meta
                                        else f"--{dashed}")
            yield method, f, flag, meta


def _add_quant(p: argparse.ArgumentParser) -> None:
    """The quantization options: QuantConfig's, then each method's, built from the config dataclasses (their
    defaults are the only defaults)."""
    from .config import METHOD_CONFIGS, POT_ROUNDING, describe_method_default, field_defaults

    d = field_defaults()
    g = p.add_argument_group("quantization")
    g.add_argument("--method", default=d["method"],
                   help=f"one of: {', '.join(sorted(METHOD_CONFIGS))} (default %(default)s)")
    g.add_argument("--wbits", type=int, default=d["wbits"], help="weight bits: 2-8 or 16 (default %(default)s)")
    g.add_argument("--abits", type=int, default=d["abits"], help="activation bits: 2-8 or 16 (default %(default)s)")
    g.add_argument("--scales", default=d["scales"],
                   help=f"float (any scale) or pot (powers of two); default: {describe_method_default('scales')}")
    g.add_argument("--pot-rounding", default=d["pot_rounding"], choices=POT_ROUNDING,
                   help="how scales become 2^k with --scales pot; default: "
                        f"{describe_method_default('pot_rounding')}")
    g.add_argument("--act-symmetry", default=d["act_symmetry"],
                   help="auto, symmetric or asymmetric activations (default %(default)s)")
    g.add_argument("--first-last-8bit", action="store_true", help="keep the first conv and the classifier at 8 bits")
    g.add_argument("--float-ops", default=",".join(d["float_ops"]),
                   help="comma-separated node names (globs) to leave in float (default: none)")
    g.add_argument("--calib", type=int, default=512, help="calibration images from train/ (default %(default)s)")
    g.add_argument("--shift-terms", type=int, default=d["shift_terms"],
                   help="requantization as a sum of 1 or 2 powers of two (default %(default)s)")
    m = p.add_argument_group("method options (each for its own --method)")
    for method, f, flag, meta in _method_flags():
        dest = f"opt_{method}_{f.name}"
        if "choices" in meta:
            word = next(k for k, v in meta["choices"].items() if v == f.default)
            m.add_argument(flag, dest=dest, choices=list(meta["choices"]), default=None,
                           help=f"{meta['help']} (default {word})")
        elif isinstance(f.default, bool):
            m.add_argument(flag, dest=dest, action="store_const", const=not f.default, default=None,
                           help=meta["help"])
        else:
            m.add_argument(flag, dest=dest, type=type(f.default), default=None, metavar=f.name.upper(),
                           help=f"{meta['help']} (default {f.default})")


def _quant_config(args: argparse.Namespace):
    """The QuantConfig of the parsed options: what ``QuantConfig(...)`` gives for the same values. An option
    of another method than ``--method`` is an error (it would change nothing)."""
    from .config import METHOD_CONFIGS, QuantConfig

    if args.method not in METHOD_CONFIGS:  # QuantConfig's own message
        QuantConfig(method=args.method)
    options = {}
    for method, f, flag, meta in _method_flags():
        value = getattr(args, f"opt_{method}_{f.name}")
        if value is None:
            continue
        if method != args.method:
            raise HybridQuantError(f"{flag} is an option of --method {method}, not of {args.method}")
        options[f.name] = meta["choices"][value] if "choices" in meta else value
    return QuantConfig(
        method=args.method, wbits=args.wbits, abits=args.abits, scales=args.scales, pot_rounding=args.pot_rounding,
        act_symmetry=args.act_symmetry, first_last_8bit=args.first_last_8bit,
        float_ops=tuple(x.strip() for x in args.float_ops.split(",") if x.strip()), shift_terms=args.shift_terms,
        options=METHOD_CONFIGS[args.method](**options),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridquant", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hybridquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="top-1/top-5 of a float or quantized model on the eval split")
    _add_model(p, required=False)
    _add_data(p)
    _add_common(p)
    p.add_argument("--qmodel", default=None, help="evaluate a quantized model.hq instead of --model")
    p.add_argument("--integer", action="store_true",
                   help="with --qmodel: run the integer-only program and compare it with the simulation")
    p.add_argument("--runtime", choices=["c"], default=None,
                   help="with --qmodel: export the integer program as C, compile it with the system compiler and "
                        "run it on the uint8 images (keys top1, agreement_sim, agreement_integer, "
                        "max_logit_diff_lsb, images_per_second)")
    p.add_argument("--allow-float-multipliers", action="store_true",
                   help="with --integer: accept requantization multipliers that are not powers of two")
    p.add_argument("--onnx", default=None,
                   help="evaluate an ONNX model from 'export --format onnx' with onnxruntime (its preprocessing "
                        "comes from the file); with --qmodel also its top-1 agreement with the simulation")
    p.add_argument("--program", default=None,
                   help="run an integer program from 'export --format npz' with the numpy reference reader "
                        "(slow: use --limit); its preprocessing comes from the file")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--predictions", action="store_true",
                   help="also report each eval image's top-1 class id, in the eval split's order (not with --integer)")

    p = sub.add_parser("quantize", help="calibrate, quantize and evaluate; writes report.json, report.md, model.hq")
    _add_model(p)
    _add_data(p)
    _add_common(p)
    _add_quant(p)
    p.add_argument("--memory-budget", type=parse_size, default=None,
                   help="memory for calibration values, e.g. 6G or 512M; beyond it they spill to <out-dir>/.spill "
                        "(removed at the end): slower, same result (default: sized to this machine's memory)")
    p.add_argument("--out-dir", required=True, help="folder for report.json, report.md and model.hq")

    p = sub.add_parser("analyze", help="per-layer / per-channel activation outlier analysis with plots")
    _add_model(p)
    _add_data(p, limit=False)
    _add_common(p)
    p.add_argument("--calib", type=int, default=256, help="calibration images from train/ (default 256)")
    p.add_argument("--out-dir", required=True, help="folder for analysis.json, analysis.md and PNG plots")

    p = sub.add_parser("train", help="train a timm model on an ImageFolder (small-data recipe)")
    _add_model(p)
    _add_data(p, limit=False)
    _add_common(p)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every N epochs (and at the end)")
    p.add_argument("--init-checkpoint", default=None, help="start from these weights (fine-tuning) instead of random")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", required=True, help="checkpoint to write (resumes from <out>.state)")

    p = sub.add_parser("export", help="write the integer program of a model.hq for hardware (npz, or a C99 "
                                      "project that runs it) or the model as QDQ ONNX")
    p.add_argument("--qmodel", required=True,
                   help="quantized model.hq (npz / c: with power-of-two or two-term multipliers)")
    p.add_argument("--format", choices=["npz", "c", "onnx"], default="npz",
                   help="npz (arrays + JSON manifest inside), c (a C99 project: model.h/model.c, the integer "
                        "kernels, main.c and a Makefile; no malloc, no floating point) or onnx (QDQ model, opset "
                        "21, needs the 'export' extra); default npz")
    p.add_argument("--out", required=True, help="file to write (a folder for --format c)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(batch_size=1, workers=0, seed=0)  # no data loading: neutral values for main()'s checks
    return parser


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _overrides(args: argparse.Namespace):
    from .data import DataOverrides

    return DataOverrides(args.img_size, args.mean, args.std, args.interpolation, args.crop_pct)


def _check_runtime(args: argparse.Namespace) -> None:
    if args.batch_size <= 0:
        raise HybridQuantError(f"--batch-size must be positive, got {args.batch_size}")
    if args.workers < 0:
        raise HybridQuantError(f"--workers must be >= 0, got {args.workers}")
    if args.command == "quantize":
        _quant_config(args)  # a bad option combination is reported before the paths are read


#: input-file options -> what the file is, as the error messages name it
_INPUT_FILES = {"checkpoint": "checkpoint", "init_checkpoint": "checkpoint", "qmodel": "quantized model",
                "program": "integer program", "onnx": "ONNX model"}
#: the --data splits each command reads
_DATA_SPLITS = {"eval": ("eval",), "quantize": ("train", "eval"), "analyze": ("train",), "train": ("train", "eval")}
#: the fixed file names each command writes into --out-dir
_OUT_DIR_FILES = {"quantize": ("model.hq", "report.json", "report.md"), "analyze": ("analysis.json", "analysis.md")}


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse every bad input file, data folder and output path before loading anything."""
    from ._io import check_input_file, check_out_dir, check_out_file

    for dest, what in _INPUT_FILES.items():
        if getattr(args, dest, None):
            check_input_file(getattr(args, dest), what)
    if getattr(args, "data", None):
        from .data import split_dir

        for split in _DATA_SPLITS.get(args.command, ()):
            split_dir(args.data, split)
    if getattr(args, "out_dir", None):
        check_out_dir(args.out_dir, "--out-dir", _OUT_DIR_FILES.get(args.command, ()))
    if getattr(args, "out", None):
        if getattr(args, "format", None) == "c":  # a project folder
            check_out_dir(args.out, "--out", ("model.h", "model.c"))
        else:
            check_out_file(args.out, "--out")


def _read(load, path: str, what: str, fmt: str, own: tuple[type[BaseException], ...] = ()):
    """``load(path)`` of a file whose reader is not ours: a failure to parse it is one line naming it.

    The reader's own diagnoses (a HybridQuantError raised without a cause, or caused by one of
    ``own``) pass through; anything else means the file is not a valid or complete ``fmt`` file.
    """
    from ._io import invalid_file

    try:
        return load(path)
    except HybridQuantError as exc:
        if exc.__cause__ is None or isinstance(exc.__cause__, own):
            raise
        raise invalid_file(what, path, fmt) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise invalid_file(what, path, fmt) from exc


def _print_result(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))


def _eval_dataset(args: argparse.Namespace, data_cfg: dict[str, Any], class_names, num_classes: int,
                  pixels: bool = False):
    """The eval split (its --limit subset), preprocessed for the model (with ``pixels``: only resized and cropped,
    uint8) and checked against its classes."""
    from .data import (
        PixelTransform,
        balanced_subset,
        check_class_names,
        data_config,
        eval_transform,
        image_folder,
    )

    cfg = data_config(data_cfg, _overrides(args))
    dataset = image_folder(args.data, "eval", PixelTransform(cfg) if pixels else eval_transform(cfg))
    check_class_names(dataset, class_names, num_classes)
    return balanced_subset(dataset, args.limit)


def _eval_loader(args: argparse.Namespace, data_cfg: dict[str, Any], class_names, num_classes: int):
    """A DataLoader over :func:`_eval_dataset`."""
    from .data import make_loader

    return make_loader(_eval_dataset(args, data_cfg, class_names, num_classes), args.batch_size, args.workers)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate one model. Under ``torchrun --nproc_per_node N`` the --model and --qmodel simulation
    evaluations are split over the N ranks (:func:`hybridquant.evaluate.evaluate_sharded`); rank 0 alone
    prints the result and writes --out, the other ranks return None."""
    from ._io import write_json
    from .distributed import is_main, launched_world_size, process_group
    from .evaluate import evaluate_sharded

    if launched_world_size() > 1 and (args.program or args.onnx or args.integer or args.runtime):
        raise HybridQuantError("under torchrun eval splits --model and --qmodel only; "
                               "run --program, --onnx and --integer in one process")
    if args.predictions and (args.integer or args.runtime):
        raise HybridQuantError("--predictions is not available with --integer or --runtime")
    if args.runtime and (args.integer or not args.qmodel):
        raise HybridQuantError("--runtime c runs a --qmodel's program in C; it does not go with --integer")
    device = "cpu" if args.qmodel else _device(args)  # a --qmodel's simulation runs on the CPU
    with process_group(device):
        if args.program:
            out = _eval_program(args)
        elif args.onnx:
            out = _eval_onnx(args)
        elif args.qmodel:
            out = _eval_qmodel(args)
        elif not args.model:
            raise HybridQuantError("eval needs --model, --qmodel or --onnx")
        else:
            from .models import load_model

            loaded = load_model(args.model, args.checkpoint, args.weights or args.pretrained, img_size=args.img_size)
            dataset = _eval_dataset(args, loaded.data_cfg, loaded.class_names, loaded.num_classes)
            result = evaluate_sharded(loaded.model.to(device), dataset, args.batch_size, args.workers, device)
            out = {"model": args.model, "source": loaded.source, **result.summary(args.predictions)}
        if not is_main():
            return None  # every rank holds the same result; rank 0 reports it
        if args.out:
            write_json(args.out, out)
    return out


def _eval_qmodel(args: argparse.Namespace) -> dict[str, Any]:
    from . import qmodel
    from .data import make_loader
    from .evaluate import evaluate_sharded

    if args.model or args.checkpoint:
        raise HybridQuantError("--qmodel carries its own model; do not pass --model or --checkpoint")
    qgraph, meta = qmodel.load(args.qmodel)
    c = qgraph.config
    head = {"qmodel": str(args.qmodel), "method": c.method, "wbits": c.wbits, "abits": c.abits, "scales": c.scales}
    if args.runtime == "c":
        from .data import data_config
        from .export.c_eval import evaluate_c

        cfg = data_config(meta["data_cfg"], _overrides(args))  # the C input table normalises with it
        dataset = _eval_dataset(args, meta["data_cfg"], meta.get("class_names"), int(meta["num_classes"]), True)
        loader = make_loader(dataset, args.batch_size, args.workers)
        from .report import environment

        result = evaluate_c(qgraph, {**meta, "data_cfg": cfg}, loader, len(loader))
        return {**head, "runtime": "c", **result, "environment": environment()}
    dataset = _eval_dataset(args, meta["data_cfg"], meta.get("class_names"), int(meta["num_classes"]))
    if args.integer:
        from .integer.evaluate import evaluate_integer

        loader = make_loader(dataset, args.batch_size, args.workers)
        return {**head, **evaluate_integer(qgraph, loader, args.allow_float_multipliers)}
    result = evaluate_sharded(qgraph.run, dataset, args.batch_size, args.workers, "cpu")
    return {**head, **result.summary(args.predictions)}


def _eval_program(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from .evaluate import evaluate
    from .export import load_npz
    from .export import reader as rr

    if args.model or args.checkpoint or args.qmodel or args.onnx:
        raise HybridQuantError("--program carries its own model; do not pass --model, --checkpoint, --qmodel or --onnx")
    manifest, arrays = _read(load_npz, args.program, "integer program", "npz", own=(json.JSONDecodeError,))
    try:
        program = rr.checked(rr.Program(manifest, arrays))
        meta = manifest["model"]
        data_cfg, num_classes = meta["data_cfg"], int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HybridQuantError(f"malformed integer program {args.program}: {exc}") from exc
    loader = _eval_loader(args, data_cfg, meta.get("class_names"), num_classes)

    def run(x: torch.Tensor) -> torch.Tensor:
        logits, _ = rr.run(program, x.numpy().astype(np.float32))
        return torch.from_numpy(logits)

    c = manifest.get("config") or {}
    head = {"program": str(args.program), "method": c.get("method"), "wbits": c.get("wbits"), "abits": c.get("abits")}
    return {**head, **evaluate(run, loader, "cpu", desc="eval program").summary(args.predictions)}


def _eval_onnx(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .data import data_config
    from .evaluate import evaluate
    from .export.onnx import OnnxRunner

    if args.model or args.checkpoint:
        raise HybridQuantError("--onnx carries its own model; do not pass --model or --checkpoint")
    if args.integer:
        raise HybridQuantError("--integer runs the integer program of a --qmodel; it cannot be combined with --onnx")
    runner = _read(lambda path: OnnxRunner(path, threads=torch.get_num_threads()), args.onnx, "ONNX model", "ONNX",
                   own=(ImportError, json.JSONDecodeError))
    qgraph = None
    if args.qmodel:  # fail on a bad --qmodel before evaluating anything
        from . import qmodel

        qgraph, _ = qmodel.load(args.qmodel)
    meta = runner.meta
    if not isinstance(meta.get("data_cfg"), dict) or meta.get("num_classes") is None:
        raise HybridQuantError(f"{args.onnx} has no data config or class count in its metadata; "
                               "cannot rebuild the preprocessing")
    size = list(data_config(meta["data_cfg"], _overrides(args))["input_size"])
    if [int(v) for v in size] != [int(v) for v in runner.input_shape[1:]]:
        raise HybridQuantError(f"the ONNX model takes inputs of size {runner.input_shape[1:]}, "
                               f"the preprocessing gives {size}")
    loader = _eval_loader(args, meta["data_cfg"], meta.get("class_names"), int(meta["num_classes"]))
    c = meta.get("config") or {}
    head = {"onnx": str(args.onnx), "method": c.get("method"), "wbits": c.get("wbits"), "abits": c.get("abits"),
            "scales": c.get("scales")}
    result = evaluate(runner, loader, "cpu", desc="eval onnx")
    out = {**head, **result.summary(args.predictions)}
    if qgraph is not None:
        sim = evaluate(qgraph.run, loader, "cpu", desc="eval simulation")
        n = max(result.images, 1)
        out["qmodel"] = str(args.qmodel)
        out["agreement_sim"] = float((result.predictions == sim.predictions).sum()) / n
    return out


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any] | None:
    """Quantize, evaluate and write the model and its report. Under ``torchrun --nproc_per_node N`` the
    evaluations are split over the N ranks and calibration runs whole on each (so every rank builds the
    same model); rank 0 alone writes the outputs and prints the summary."""
    from . import qmodel
    from ._io import write_json, write_text
    from .distributed import is_main, process_group
    from .pipeline import DataSpec, quantize_job
    from .report import quantize_report_md

    config = _quant_config(args)
    data = DataSpec(args.data, _overrides(args), args.limit, args.calib, args.batch_size, args.workers, args.seed)
    out_dir = Path(args.out_dir)
    device = _device(args)
    with process_group(device):
        report, qgraph, meta = quantize_job(args.model, args.checkpoint, args.weights or args.pretrained, data,
                                            config, device, memory_budget=args.memory_budget,
                                            spill_dir=out_dir / ".spill")
        if not is_main():
            return None
        qmodel.save(out_dir / "model.hq", qgraph, meta)
        write_json(out_dir / "report.json", report)
        write_text(out_dir / "report.md", quantize_report_md(report))
    keys = ("method", "wbits", "abits", "scales", "fp32_top1", "quant_top1", "drop_pp", "drop_ci95_pp",
            "agreement_fp32", "eval_images", "param_increase_pct", "seconds", "peak_rss_mb")
    return {**{k: report[k] for k in keys}, "out_dir": str(out_dir)}


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from ._io import write_json, write_text
    from .analysis import analysis_markdown, analyze_graph
    from .data import data_config
    from .graph import capture
    from .models import load_model
    from .pipeline import DataSpec, load_calibration
    from .plots import analysis_plots

    loaded = load_model(args.model, args.checkpoint, args.weights or args.pretrained, img_size=args.img_size)
    cfg = data_config(loaded.data_cfg, _overrides(args))
    data = DataSpec(args.data, _overrides(args), None, args.calib, args.batch_size, args.workers, args.seed)
    images = load_calibration(data, cfg)
    result = analyze_graph(capture(loaded.model, tuple(cfg["input_size"])), images)
    result["model"] = args.model
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = analysis_plots(result, out_dir)
    write_json(out_dir / "analysis.json", result)
    write_text(out_dir / "analysis.md", analysis_markdown(result, args.model, plots))
    return {"out_dir": str(out_dir), "worst_layers": result["worst_layers"][:5], "blocks": result["blocks"]}


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .train import TrainRecipe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = TrainRecipe(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=args.seed,
    )
    metrics = train(args.model, args.data, args.out, recipe, _overrides(args), _device(args), args.workers,
                    args.eval_every, args.init_checkpoint)
    return {"checkpoint": args.out, **metrics}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from . import qmodel
    from .export import export_c, export_npz, export_onnx

    qgraph, meta = qmodel.load(args.qmodel)
    out = Path(args.out)  # checked up front (main): a file name in a writable folder
    extra: dict[str, Any] = {}
    try:
        if args.format == "npz":
            manifest = export_npz(qgraph, out, meta)
            ops = len(manifest["ops"])
        elif args.format == "onnx":
            summary = export_onnx(qgraph, out, meta)
            ops = summary["nodes"]
            extra = {"opset": summary["opset"], "qdq_pairs": summary["qdq_pairs"]}
        else:
            facts = export_c(qgraph, out, meta, measure_code=True)
            ops = facts["ops"]
            extra = {"files": sorted(p.name for p in out.iterdir()), "scratch_bytes": facts["scratch_bytes"],
                     "constant_bytes": facts["constant_bytes"]}
    except OSError as exc:
        raise HybridQuantError(f"cannot write {out}: {exc.strerror or exc}") from exc
    size = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else out.stat().st_size
    return {"qmodel": str(args.qmodel), "format": args.format, "out": str(out), "ops": ops, "bytes": size, **extra}


COMMANDS = {"analyze": cmd_analyze, "eval": cmd_eval, "export": cmd_export, "quantize": cmd_quantize,
            "train": cmd_train}


def _user_message(exc: BaseException) -> str | None:
    """The one-line message for a user error, also when a DataLoader worker raised it."""
    if isinstance(exc, HybridQuantError):
        text = str(exc)
        marker = "HybridQuantError: "
        if "Original Traceback" in text and marker in text:  # re-raised from a worker
            text = text.rsplit(marker, 1)[1]
        return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    heap.prepare_environment()  # this module imports no torch: the commands do, after this
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_runtime(args)
        _check_paths(args)
        _seed(args.seed)
        heap.configure()  # chunk-sized tensors get their own mappings: memory flat in calibration images
        result = COMMANDS[args.command](args)
    except Exception as exc:
        message = _user_message(exc)
        if message is None or args.debug:
            raise
        print(f"hybridquant {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result is not None:
        _print_result(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

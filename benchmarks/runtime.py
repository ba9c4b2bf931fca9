"""Speed of the runtimes of one quantized model, side by side in one run on the same images.

On ``--images`` CIFAR-10 test images (class-balanced, the uint8 image after resize and crop), with one thread
each, it times:

* ``python_integer``: the Python integer executor (:class:`~hybridquant.integer.executor.IntegerModel`);
* ``c``: the exported C program (``export --format c``; ``-O3`` and this machine's vector instructions), the
  processor time inside ``hq_run``;
* ``simulation``: the fake-quantized simulation (``QuantizedGraph.run``);
* ``onnxruntime_qdq``: the QDQ ONNX export in onnxruntime (when the ``export`` extra is installed);
* ``fp32``: the float model in PyTorch.

It checks that the C program's output codes equal the integer executor's on every image (``c_identical``).
The model is ``--qmodel``, or the bundled default quantized here (hfq W8A8, power-of-two scales,
``--calib`` images, ``--reconstruction-iters`` steps). Writes ``benchmarks/results/runtime/<name>.json`` and
``.md`` with the environment (torch, CPU model and flags, cores, date) and the throughput ratios to the
Python integer executor.

Usage::

    python benchmarks/runtime.py [--qmodel D/model.hq] [--images 500] [--data ../shared/data/cifar10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridquant._io import write_json, write_text
from hybridquant.report import environment, markdown_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "runtime"
BATCH = 100


def cpu_info() -> dict[str, Any]:
    """The CPU model and its vector extensions (from /proc/cpuinfo where readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    vector = [f for f in flags if f.startswith(("avx", "sse4", "fma", "amx"))]
    return {"cpu_model": fields.get("model name"), "vector_flags": sorted(vector)}


def _timed(fn, batches) -> tuple[list[Any], float]:
    out, start = [], time.perf_counter()
    for b in batches:
        out.append(fn(b))
    return out, time.perf_counter() - start


def measure(qgraph, meta: dict[str, Any], fp32_model, pixels: np.ndarray) -> dict[str, Any]:
    """Images per second of every runtime on ``pixels`` [N, H, W, C] (one thread each)."""
    from hybridquant.export.c import STRICT_CFLAGS, build_c, export_c, native_flag, pixels_to_images, run_c
    from hybridquant.integer.executor import IntegerModel

    n = len(pixels)
    images = [pixels_to_images(pixels[i:i + BATCH], meta) for i in range(0, n, BATCH)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    try:
        integer = IntegerModel(qgraph)
        codes, seconds = _timed(lambda x: integer.run(x)[1].reshape(len(x), -1).numpy(), images)
        rows["python_integer"] = n / seconds
        _, seconds = _timed(qgraph.run, images)
        rows["simulation"] = n / seconds
        with torch.no_grad():
            _, seconds = _timed(fp32_model, images)
        rows["fp32"] = n / seconds
        with tempfile.TemporaryDirectory(prefix="hq-runtime-") as tmp:
            export_c(qgraph, f"{tmp}/model", meta)
            flags = STRICT_CFLAGS + " -DHQ_TIMING" + native_flag()
            c_codes, c_seconds = run_c(build_c(f"{tmp}/model", flags), pixels, tmp)
            rows["c"] = n / c_seconds
            identical = bool(np.array_equal(c_codes, np.concatenate(codes)))
            try:
                from hybridquant.export.onnx import OnnxRunner, export_onnx

                export_onnx(qgraph, f"{tmp}/model.onnx", meta)
                runner = OnnxRunner(f"{tmp}/model.onnx", threads=1)
                _, seconds = _timed(runner, images)
                rows["onnxruntime_qdq"] = n / seconds
            except ImportError:
                rows["onnxruntime_qdq"] = None
    finally:
        torch.set_num_threads(threads)
    base = rows["python_integer"]
    return {"images": n, "threads": 1, "images_per_second": {k: round(v, 1) if v else None for k, v in rows.items()},
            "ratio_to_python_integer": {k: round(v / base, 2) if v else None for k, v in rows.items()},
            "c_identical": identical, "cflags": flags.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qmodel", default=None, help="a quantized model.hq (default: quantize the bundled model)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--reconstruction-iters", type=int, default=30)
    p.add_argument("--name", default="mobilevit_xxs.cifar10_hfq_W8A8_pot")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"runtime: no ImageFolder at {args.data}", file=sys.stderr)
        return 2

    from hybridquant import qmodel
    from hybridquant.config import QuantConfig
    from hybridquant.data import DataOverrides, PixelTransform, balanced_subset, data_config, image_folder
    from hybridquant.models import load_model
    from hybridquant.pipeline import DataSpec, model_meta, prepare
    from hybridquant.quantize import quantize_graph

    if args.qmodel:
        qgraph, meta = qmodel.load(args.qmodel)
        source = args.qmodel
        fp32 = load_model(meta["name"]).model.eval()  # a bundled or timm name (hub weights need a network)
    else:
        torch.manual_seed(0)
        data = DataSpec(Path(args.data), DataOverrides(), limit=args.images, calib=args.calib, batch_size=BATCH,
                        workers=0, seed=0)
        prep = prepare("mobilevit_xxs.cifar10", None, False, data, progress=False)
        config = QuantConfig.build(method="hfq", scales="pot", reconstruction_iters=args.reconstruction_iters)
        qgraph = quantize_graph(prep.graph, config, prep.calib, progress=False)
        meta = model_meta(prep.loaded, prep.cfg)
        source = f"bundled mobilevit_xxs.cifar10, hfq W8A8 pot, {args.calib} calibration images"
        fp32 = prep.loaded.model.eval()
    cfg = data_config(meta["data_cfg"])
    dataset = balanced_subset(image_folder(args.data, "eval", PixelTransform(cfg)), args.images)
    pixels = np.stack([dataset[i][0] for i in range(len(dataset))])
    result = {"model": source, **measure(qgraph, {**meta, "data_cfg": cfg}, fp32, pixels),
              "environment": {**environment(), **cpu_info()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", result)
    rows = [{"runtime": k, "images_per_second": v, "ratio": result["ratio_to_python_integer"][k]}
            for k, v in result["images_per_second"].items()]
    md = [f"# Runtime speed: {source}", "",
          f"{result['images']} CIFAR-10 test images, one thread each, {result['environment'].get('cpu_model')}; "
          f"the C program's codes equal the integer executor's: {result['c_identical']}.", "",
          markdown_table(rows, ["runtime", "images_per_second", "ratio"],
                         ["runtime", "images/s", "× Python integer executor"],
                         {"images_per_second": lambda v: "—" if v is None else f"{v:,.1f}",
                          "ratio": lambda v: "—" if v is None else f"{v:.2f}"})]
    write_text(RESULTS / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of the runtimes of one quantized model, side by side in one run on the same images.

On ``--images`` CIFAR-10 test images (class-balanced, the uint8 image after resize and crop), with one and with
two threads each, it times:

* ``python_integer``: the Python integer executor (:class:`~hybridquant.integer.executor.IntegerModel`);
* ``c``: the exported C program (``export --format c``; ``-O3`` and this machine's vector instructions), the
  time inside ``hq_run`` (with 2 threads built with ``-fopenmp``, images in parallel, wall time);
* ``simulation``: the fake-quantized simulation (``QuantizedGraph.run``);
* ``onnxruntime_qdq``: the QDQ ONNX export in onnxruntime (when the ``export`` extra is installed);
* ``fp32``: the float model in PyTorch.

It checks that the C program's output codes equal the integer executor's on every image (``c_identical``).
The model is ``--qmodel``, or the bundled default quantized here (hfq W8A8, power-of-two scales,
``--calib`` images, ``--reconstruction-iters`` steps). Writes ``benchmarks/results/runtime/<name>.json`` and
``.md`` with the environment (torch, CPU model and flags, cores, date) and the throughput ratios to the
Python integer executor. Each runtime's speed is the best of ``ROUNDS`` rounds that time every runtime in turn;
``ratio_to_python_integer_by_round`` keeps each round's own ratios (the spread of a shared machine).

Usage::

    python benchmarks/runtime.py [--qmodel D/model.hq] [--images 500] [--data ../shared/data/cifar10]
"""

from __future__ import annotations

import argparse
import shutil
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
#: the thread counts every runtime is timed at
THREADS = (1, 2)
#: rounds of timing every runtime in turn; each runtime reports its best
ROUNDS = 5


def _fmt(spec: str):
    return lambda v: "—" if v is None else format(v, spec)


def _timed(fn, batches) -> tuple[list[Any], float]:
    out, start = [], time.perf_counter()
    for b in batches:
        out.append(fn(b))
    return out, time.perf_counter() - start


def _torch_rows(fns: dict[str, Any], images) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Images per second of each torch-driven runtime on the batches ``images``, and their outputs."""
    n = sum(len(b) for b in images)
    rates, outputs = {}, {}
    for name, fn in fns.items():
        outputs[name], seconds = _timed(fn, images)
        rates[name] = n / seconds
    return rates, outputs


def measure(qgraph, meta: dict[str, Any], fp32_model, pixels: np.ndarray,
            thread_counts: tuple[int, ...] = THREADS, rounds: int = ROUNDS) -> dict[str, Any]:
    """Images per second of every runtime on ``pixels`` [N, H, W, C], at each thread count (the C program over
    images with OpenMP, the others through torch's and onnxruntime's own threads): the best of ``rounds``
    rounds, each timing every runtime in turn (so a slow spell of a shared machine does not fall on one)."""
    from hybridquant.export.c import STRICT_CFLAGS, build_c, export_c, native_flag, pixels_to_images, run_c
    from hybridquant.integer.executor import IntegerModel

    n = len(pixels)
    images = [pixels_to_images(pixels[i:i + BATCH], meta) for i in range(0, n, BATCH)]
    before = torch.get_num_threads()
    integer = IntegerModel(qgraph)
    rows: dict[str, dict[str, float | None]] = {}
    by_round: dict[str, list[dict[str, float | None]]] = {}  # each round's ratios: the spread of a shared machine
    identical = True
    try:
        with tempfile.TemporaryDirectory(prefix="hq-runtime-") as tmp:
            export_c(qgraph, f"{tmp}/model", meta)
            flags = STRICT_CFLAGS + " -DHQ_TIMING" + native_flag()
            binaries = {1: build_c(f"{tmp}/model", flags)}
            if max(thread_counts) > 1:
                shutil.copytree(f"{tmp}/model", f"{tmp}/omp/model")  # the same project, built again
                binaries[2] = build_c(f"{tmp}/omp/model", flags + " -fopenmp")
            onnx_runners = {}
            try:
                from hybridquant.export.onnx import OnnxRunner, export_onnx

                export_onnx(qgraph, f"{tmp}/model.onnx", meta)
                onnx_runners = {t: OnnxRunner(f"{tmp}/model.onnx", threads=t) for t in thread_counts}
            except ImportError:
                pass
            for _ in range(rounds):
                for t in thread_counts:
                    torch.set_num_threads(t)
                    with torch.no_grad():
                        row, outputs = _torch_rows({"python_integer": lambda x: integer.run(x)[1],
                                                    "simulation": qgraph.run, "fp32": fp32_model}, images)
                    row["onnxruntime_qdq"] = (_torch_rows({"o": onnx_runners[t]}, images)[0]["o"] if onnx_runners
                                              else None)
                    c_codes, c_seconds = run_c(binaries[min(t, 2)], pixels, tmp, threads=t if t > 1 else None)
                    row["c"] = n / c_seconds
                    codes = np.concatenate([c.reshape(len(c), -1).numpy() for c in outputs["python_integer"]])
                    identical = identical and bool(np.array_equal(c_codes, codes))
                    by_round.setdefault(str(t), []).append(
                        {k: round(v / row["python_integer"], 2) if v else None for k, v in row.items()})
                    best = rows.setdefault(str(t), {})
                    for k, v in row.items():  # the best of the rounds: the least disturbed run of each
                        if best.get(k) is None or (v is not None and v > best[k]):
                            best[k] = v
    finally:
        torch.set_num_threads(before)
    out = {"images": n, "thread_counts": list(thread_counts), "rounds": rounds, "cflags": flags.strip(),
           "cflags_threads": (flags + " -fopenmp").strip(), "c_identical": identical}
    out["images_per_second"] = {t: {k: round(v, 1) if v else None for k, v in r.items()} for t, r in rows.items()}
    out["ratio_to_python_integer"] = {t: {k: round(v / r["python_integer"], 2) if v else None for k, v in r.items()}
                                      for t, r in rows.items()}
    out["ratio_to_python_integer_by_round"] = by_round
    return out


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
              "environment": environment()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", result)
    speed, ratio = result["images_per_second"], result["ratio_to_python_integer"]
    rows = [{"runtime": k, **{f"ips{t}": speed[t][k] for t in speed}, **{f"ratio{t}": ratio[t][k] for t in speed}}
            for k in speed["1"]]
    number = {**{f"ips{t}": _fmt(",.1f") for t in speed}, **{f"ratio{t}": _fmt(".2f") for t in speed}}
    md = [f"# Runtime speed: {source}", "",
          f"{result['images']} CIFAR-10 test images on {result['environment'].get('cpu_model')}; the C program's "
          f"codes equal the integer executor's: {result['c_identical']}. The C program runs its images in "
          "parallel with OpenMP; the others use torch's and onnxruntime's threads within each batch of "
          f"{BATCH}. Each figure is the best of {result['rounds']} rounds that time every runtime in turn.", "",
          markdown_table(rows, ["runtime", *[f"ips{t}" for t in speed], *[f"ratio{t}" for t in speed]],
                         ["runtime", *[f"images/s, {t} thread{'s' * (t != '1')}" for t in speed],
                          *[f"× Python integer, {t} thread{'s' * (t != '1')}" for t in speed]], number)]
    write_text(RESULTS / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

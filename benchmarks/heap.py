"""Why ``hybridquant.heap``: peak RSS of hfq W8A8 at two calibration sizes under four heap set-ups.

The calibration walkers allocate and free chunk-sized tensors thousands of times; how the C heap serves them
decides whether the process's memory grows with the calibration images. Each cell is one child process that
quantizes ``--model`` (timm's architecture, 10 classes, seeded random weights; random images: cost only)
with hfq W8A8 power-of-two scales, ``--reconstruction-iters`` steps, a ``--budget`` MiB workspace and
``--calib`` images, under one set-up (each adds to the one before):

* ``glibc``: the C heap as it is (no trim, glibc's dynamic mmap threshold, torch's default pages);
* ``trim``: ``heap.release()`` (``malloc_trim``) at phase and node boundaries;
* ``mmap``: and ``heap.configure()`` (tensors from ``heap.MMAP_THRESHOLD`` up get their own mappings), with
  transparent huge pages off (``THP_MEM_ALLOC_ENABLE=0``);
* ``mmap+thp``: and huge pages on: what ``hybridquant quantize`` does.

The defaults (128×128, 100 MiB workspace, 16 → 64 images) are the regime of 64 → 256 images at 256×256 —
the smaller run holds its values, the larger spills — at a sixteenth of the cost (about 10 minutes on 2
cores). Writes ``benchmarks/results/heap.{json,md}``: per set-up the peak RSS and seconds at each size, and
the RSS ratio and time of the larger run against the ``glibc`` one.

Usage::

    python benchmarks/heap.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

SETUPS = ("glibc", "trim", "mmap", "mmap+thp")
SEED = 0


def child(setup: str, model: str, size: int, calib: int, budget_mb: int, iters: int) -> dict[str, Any]:
    """One quantization under ``setup``, in this (fresh) process: its peak RSS (MB) and seconds."""
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if setup == "mmap+thp" else "0"  # read once, at torch's import
    import timm
    import torch

    from hybridquant import heap
    from hybridquant.config import QuantConfig
    from hybridquant.graph.capture import capture
    from hybridquant.phases import Phases
    from hybridquant.quantize import quantize_graph
    from hybridquant.store import Workspace

    if setup == "glibc":
        heap.release = lambda: None  # the walkers and the phase boundaries call it through the module
    if setup in ("mmap", "mmap+thp") and not heap.configure():
        raise SystemExit("glibc's mallopt is not available here")
    torch.manual_seed(SEED)
    graph = capture(timm.create_model(model, num_classes=10).eval(), (3, size, size))
    images = list(torch.randn(calib, 3, size, size, generator=torch.Generator().manual_seed(SEED)).split(16))
    config = QuantConfig.build(method="hfq", wbits=8, abits=8, scales="pot", reconstruction_iters=iters)
    start = time.perf_counter()
    with Workspace(budget_mb * 2**20) as ws, Phases(progress=False) as phases:
        quantize_graph(graph, config, images, workspace=ws)
    return {"setup": setup, "calib": calib, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": phases.summary()["peak_rss_mb"], "workspace": ws.stats()}


def markdown(result: dict[str, Any]) -> str:
    from hybridquant.report import fmt_mb, markdown_table

    lo, hi = result["calib"]
    base = next(r for r in result["setups"] if r["setup"] == "glibc")
    rows = [{"setup": f"`{r['setup']}`", "lo": fmt_mb(r["peak_rss_mb"][str(lo)]),
             "hi": fmt_mb(r["peak_rss_mb"][str(hi)]), "ratio": f"{r['rss_ratio']:.2f}",
             "seconds": f"{r['seconds'][str(hi)]:.1f}",
             "vs": f"{r['seconds'][str(hi)] / base['seconds'][str(hi)]:.2f}×"} for r in result["setups"]]
    head = (f"hfq W8A8 of `{result['model']}` at {result['img_size']}×{result['img_size']} (random weights), "
            f"{result['budget_mb']} MiB workspace, {result['reconstruction_iters']} reconstruction steps.\n\n")
    return head + markdown_table(rows, ["setup", "lo", "hi", "ratio", "seconds", "vs"],
                                 ["heap set-up", f"peak RSS, {lo} images", f"peak RSS, {hi} images",
                                  "ratio", f"seconds, {hi} images", "time vs glibc"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--calib", default="16,64", help="the two calibration sizes compared")
    p.add_argument("--budget", type=int, default=100, help="workspace MiB")
    p.add_argument("--reconstruction-iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)  # one cell, in this process
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(c) for c in args.calib.split(",")]
    if len(sizes) != 2:
        p.error("--calib takes two sizes")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.img_size, args.images, args.budget,
                               args.reconstruction_iters)))
        return 0

    from pathlib import Path

    from hybridquant._io import write_json, write_text
    from hybridquant.report import environment

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    setups = []
    for setup in SETUPS:
        got = {}
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", setup, "--model", args.model, "--img-size",
                   str(args.img_size), "--images", str(n), "--budget", str(args.budget),
                   "--reconstruction-iters", str(args.reconstruction_iters)]
            print(f"{setup}, {n} images ...", file=sys.stderr, flush=True)
            got[n] = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                               text=True).stdout.strip().splitlines()[-1])
        setups.append({"setup": setup, "peak_rss_mb": {str(n): got[n]["peak_rss_mb"] for n in sizes},
                       "seconds": {str(n): got[n]["seconds"] for n in sizes},
                       "workspace": {str(n): got[n]["workspace"] for n in sizes},
                       "rss_ratio": round(got[sizes[1]]["peak_rss_mb"] / got[sizes[0]]["peak_rss_mb"], 3)})
    result = {"model": args.model, "img_size": args.img_size, "calib": sizes, "budget_mb": args.budget,
              "reconstruction_iters": args.reconstruction_iters, "random_weights": True, "setups": setups,
              "command": "python benchmarks/heap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": {**environment(), "torch_threads": args.threads}}
    out = Path(args.out)
    write_json(out / "heap.json", result)
    write_text(out / "heap.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

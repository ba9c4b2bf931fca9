"""Cost of ``hybridquant quantize`` (hfq W8A8, power-of-two scales: the default method) at ImageNet geometry.

Each cell is one ``python -m hybridquant quantize`` of one model at 256×256 with N calibration images, run as
a child process so that its time and peak memory are its own: the cell JSON holds the report's phases
(``{name: {seconds, peak_rss_mb, depth}}``), ``peak_rss_mb``, ``seconds`` and ``workspace``, the wall time
measured from outside, the child's maximum RSS as the kernel saw it (``os.wait4``), the command and the
environment. Cells:

* ``mobilevit_xxs`` and ``mobilevit_xs`` at 64, 128, 256 and 512 calibration images, ``mobilevit_s`` at 64
  and 128 (``--models`` / ``--calib`` choose others);
* per model, the throughput of ``hybridquant eval`` on ``--eval-images`` images in one process with
  ``--threads`` threads, and under ``torchrun --nproc_per_node 2`` with the threads split between the two.

No trained weights at 256×256 exist for these models on CIFAR-10, so each one is timm's architecture with 10
classes and seeded random weights (``torch.manual_seed(0)``), written once into ``--cache``: these runs
measure cost, not accuracy (the top-1 they record is that of random weights).

A cell whose JSON exists is skipped, so an interrupted run resumes where it stopped (``--force`` reruns;
a cell on disk keeps the options it ran with, which it records). A cell that fails records ``error`` (the
tail of its stderr) and the suite goes on.

Usage::

    python benchmarks/scale.py                                   # every cell, then the summary
    python benchmarks/scale.py --models mobilevit_xxs --calib 64,128
    python benchmarks/scale.py --summary-only                    # rebuild the summary from the cells on disk

Writes ``benchmarks/results/scale/cells/<model>_c<N>.json`` and ``eval_<model>_p<P>.json``, and the summary
``benchmarks/results/scale.{json,md,png}``: per model the phase times and peak RSS against the calibration
images, a least-squares line of wall time against them, the RSS and time ratios of 256 to 64 images, the
512-image time projected from the line where that cell is missing, and eval images/s with 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from hybridquant._io import atomic_path, write_json, write_text
from hybridquant.report import DASH, environment, fmt_mb, fmt_seconds, markdown_table

#: the calibration sizes of each model's cells (mobilevit_s stops at 128: its larger cells do not fit the time)
GRID: dict[str, tuple[int, ...]] = {
    "mobilevit_xxs": (64, 128, 256, 512),
    "mobilevit_xs": (64, 128, 256, 512),
    "mobilevit_s": (64, 128),
}
#: the report phases the summary shows, in pipeline order (the method's own phases and the quantized eval)
PHASES = ("observe", "outlier scaling", "exponent search", "reconstruction", "eval quantized")
NUM_CLASSES = 10
SEED = 0
RATIO = (64, 256)  # RSS and time ratios: the larger calibration size against the smaller
PROJECT = 512  # the calibration size projected from the fit where its cell is missing
PROCS = (1, 2)  # eval processes
TAIL = 4000  # characters of a failed child's stderr kept in its cell
NOTE = (f"Each model is timm's architecture with {NUM_CLASSES} classes and seeded random weights "
        f"(torch.manual_seed({SEED})): "
        "no trained weights at 256×256 exist for these models on CIFAR-10, so these runs measure cost, not "
        "accuracy.")
#: the report fields a quantize cell keeps
REPORT_KEYS = ("seconds", "quantize_seconds", "peak_rss_mb", "phases", "workspace", "calib_images", "eval_images",
               "fp32_top1", "quant_top1", "config")


class Child(NamedTuple):
    """What a finished child process left: exit status, wall time, its maximum RSS and its stderr's tail."""

    returncode: int
    wall_seconds: float
    max_rss_mb: float
    stderr_tail: str


def run_child(cmd: list[str], threads: int) -> Child:
    """Run ``cmd`` with ``threads`` OpenMP / torch threads, echoing its stderr (the progress bars) live.

    The child is reaped with ``os.wait4`` for its ``ru_maxrss`` (KiB on Linux): the largest RSS of the child and
    of the descendants it waited for (a torchrun launcher's workers). A ``quantize`` child resets its
    high-water mark at each phase boundary (:mod:`hybridquant.phases`), so for it this is the peak since the
    last reset, outputs written after the phases included: a cross-check of the report's ``peak_rss_mb``, not
    the whole run's peak.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may split a bar's characters
    tail = ""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-TAIL:]
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return Child(proc.returncode, round(time.perf_counter() - start, 2), round(usage.ru_maxrss / 1024, 1), tail)


def checkpoint(cache: Path, model: str) -> Path:
    """``<cache>/<model>.pt``: timm's ``model`` with 10 classes and seeded random weights, written once."""
    path = cache / f"{model}.pt"
    if not path.exists():
        import timm
        import torch

        torch.manual_seed(SEED)
        state = timm.create_model(model, num_classes=NUM_CLASSES).state_dict()
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    return path


def _shown(cmd: list[str], threads: int, tmp: str) -> str:
    """The command as a shell line anyone can rerun: the thread setting, ``python``, no temporary folder."""
    return f"OMP_NUM_THREADS={threads} " + shlex.join(["python", *cmd[1:]]).replace(tmp, "OUT")


def _free_port() -> int:
    """A TCP port no one listens on now, for torchrun's rendezvous (two suites may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _common(args: argparse.Namespace, model: str, ckpt: Path) -> list[str]:
    """The options every child gets: model, weights, data and geometry."""
    extra = ["--workers", str(args.workers)] if args.workers is not None else []
    return ["--model", model, "--checkpoint", str(ckpt), "--data", args.data, "--img-size", str(args.img_size),
            "--batch-size", str(args.batch_size), *extra]


def quantize_cell(args: argparse.Namespace, model: str, calib: int, ckpt: Path) -> dict[str, Any]:
    """One ``hybridquant quantize`` of ``model`` on ``calib`` images, as a cell row."""
    iters = ["--reconstruction-iters", str(args.reconstruction_iters)] if args.reconstruction_iters is not None else []
    with tempfile.TemporaryDirectory(prefix="hq-scale-") as tmp:
        cmd = [sys.executable, "-m", "hybridquant", "quantize", *_common(args, model, ckpt), "--calib", str(calib),
               "--limit", str(args.limit), *iters, "--out-dir", tmp]
        child = run_child(cmd, args.threads)
        report = Path(tmp) / "report.json"
        got = json.loads(report.read_text()) if child.returncode == 0 and report.exists() else None
        shown = _shown(cmd, args.threads, tmp)
    row = {"model": model, "calib": calib, "img_size": args.img_size, "limit": args.limit,
           "batch_size": args.batch_size, "threads": args.threads, "reconstruction_iters": args.reconstruction_iters,
           "random_weights": True, "wall_seconds": child.wall_seconds, "max_rss_mb": child.max_rss_mb}
    if got is None:
        row["error"] = child.stderr_tail or f"exit status {child.returncode}"
    else:
        row.update({k: got[k] for k in REPORT_KEYS})
    return {**row, "command": shown, "environment": {**environment(), "torch_threads": args.threads}}


def eval_cell(args: argparse.Namespace, model: str, procs: int, ckpt: Path) -> dict[str, Any]:
    """``hybridquant eval`` of ``model`` in ``procs`` processes (torchrun when more than one), as a cell row."""
    threads = max(1, args.threads // procs)
    launch = (["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_free_port())]
              if procs > 1 else [])
    with tempfile.TemporaryDirectory(prefix="hq-scale-") as tmp:
        cmd = [sys.executable, *launch, "-m", "hybridquant", "eval", *_common(args, model, ckpt),
               "--limit", str(args.eval_images), "--out", str(Path(tmp) / "eval.json")]
        child = run_child(cmd, threads)
        out = Path(tmp) / "eval.json"
        got = json.loads(out.read_text()) if child.returncode == 0 and out.exists() else None
        shown = _shown(cmd, threads, tmp)
    row = {"model": model, "procs": procs, "threads_per_process": threads, "img_size": args.img_size,
           "batch_size": args.batch_size, "random_weights": True, "wall_seconds": child.wall_seconds,
           "max_rss_mb": child.max_rss_mb}
    if got is None:
        row["error"] = child.stderr_tail or f"exit status {child.returncode}"
    else:
        row.update({"images": got["images"], "seconds": got["seconds"], "images_per_s": got["images_per_s"],
                    "top1": got["top1"]})
    return {**row, "command": shown, "environment": {**environment(), "torch_threads": threads}}


# ---------------------------------------------------------------------------------------------------------------
# the summary


def fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares ``y = intercept + slope * x``; None with fewer than two distinct ``x``."""
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return {"seconds_per_image": round(slope, 4), "intercept_s": round(intercept, 2), "cells": len(points)}


def model_summary(rows: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's figures: the fit of wall time against calibration images, the 256/64 ratios, the
    projection to 512 images where that cell is missing, and eval images/s per process count."""
    ok = {r["calib"]: r for r in rows if "error" not in r}
    line = fit([(c, r["wall_seconds"]) for c, r in sorted(ok.items())])
    lo, hi = (ok.get(n) for n in RATIO)
    out: dict[str, Any] = {"fit": line}
    if lo and hi and lo.get("workspace", {}).get("budget_mb") == hi.get("workspace", {}).get("budget_mb"):
        out["rss_ratio"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
        out["time_ratio"] = round(hi["wall_seconds"] / lo["wall_seconds"], 3)
    if line and PROJECT not in ok:
        out["projected_s"] = round(line["intercept_s"] + line["seconds_per_image"] * PROJECT, 1)
    rate = {e["procs"]: e["images_per_s"] for e in evals if "error" not in e}
    out["eval_images_per_s"] = {str(p): rate[p] for p in sorted(rate)}
    if all(p in rate for p in PROCS):
        out["eval_speedup"] = round(rate[PROCS[1]] / rate[PROCS[0]], 3)
    return out


def load_cells(cells: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(quantize cells by model then calibration size, eval cells by model then processes) from ``cells``."""
    rows, evals = [], []
    for path in sorted(cells.glob("*.json")):
        (evals if path.name.startswith("eval_") else rows).append(json.loads(path.read_text()))
    order = {m: i for i, m in enumerate(GRID)}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["calib"]))
    evals.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["procs"]))
    return rows, evals


def _last_line(error: str) -> str:
    """The line of a failed child's stderr that says why (its last)."""
    lines = error.strip().splitlines()
    return lines[-1] if lines else "no output"


def _rate(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f}"


def _phase(row: dict[str, Any], name: str) -> float | None:
    return row.get("phases", {}).get(name, {}).get("seconds")


def markdown(summary: dict[str, Any]) -> str:
    """scale.md: per model the phase times and peak RSS against calibration images, the fit, the ratios and
    the projection; then eval throughput."""
    md = ["# scale: hfq W8A8 (power-of-two scales) at ImageNet geometry", "", NOTE, ""]
    by_model = {m: [r for r in summary["cells"] if r["model"] == m] for m in summary["models"]}
    for model, rows in by_model.items():
        if not rows:
            continue
        first = rows[0]
        iters = first["reconstruction_iters"] or "the method default"  # None: the CLI's default
        md += [f"## {model}", "", f"{first['img_size']}×{first['img_size']}, {first['limit']} eval images, batch "
               f"{first['batch_size']}, OMP_NUM_THREADS={first['threads']}, reconstruction iterations {iters}.", ""]
        table = [{"calib": r["calib"], **{p: _phase(r, p) for p in PHASES}, "seconds": r.get("seconds"),
                  "wall": r["wall_seconds"], "rss": r.get("peak_rss_mb"), "max_rss": r["max_rss_mb"],
                  "budget": r.get("workspace", {}).get("budget_mb"),
                  "spilled": r.get("workspace", {}).get("spilled_mb")} for r in rows if "error" not in r]
        cols = ["calib", *PHASES, "seconds", "wall", "rss", "max_rss", "budget", "spilled"]
        formats = {**{c: fmt_seconds for c in (*PHASES, "seconds", "wall")},
                   **{c: fmt_mb for c in ("rss", "max_rss", "budget", "spilled")}}
        if table:
            md += [markdown_table(table, cols, ["calibration images", *PHASES, "whole run", "wall (outside)",
                                                "peak RSS (report)", "max RSS (wait4)", "memory budget",
                                                "spilled"], formats), ""]
        md += [f"- {r['calib']} calibration images failed: {_last_line(r['error'])}"
               for r in rows if "error" in r]
        md += [f"- {line}" for line in figures(summary["models"][model])] + [""]
    if summary["eval"]:
        rates = [{"model": m, **{f"p{p}": s["eval_images_per_s"].get(str(p)) for p in PROCS},
                  "speedup": s.get("eval_speedup")} for m, s in summary["models"].items() if s["eval_images_per_s"]]
        first = summary["eval"][0]
        md += ["## eval throughput", "", f"`hybridquant eval` at {first['img_size']}×{first['img_size']}, "
               f"{first.get('images', '?')} images, batch {first['batch_size']}: one process with all threads, and "
               "`torchrun --nproc_per_node 2` with one thread each.", "",
               markdown_table(rates, ["model", "p1", "p2", "speedup"],
                              ["model", "images/s, 1 process", "images/s, 2 processes", "2 / 1"],
                              {"p1": _rate, "p2": _rate, "speedup": _rate}), ""]
    md += ["Environment: " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items()), ""]
    return "\n".join(md)


def figures(s: dict[str, Any]) -> list[str]:
    """The sentences of one model's summary ``s`` (the fit, the ratios, the projection), for scale.md and
    the README."""
    out = []
    if s.get("fit"):
        f = s["fit"]
        out.append(f"wall time ≈ {f['intercept_s']:.0f} s + {f['seconds_per_image']:.2f} s per calibration image "
                   f"(least squares over {f['cells']} cells)")
    if "rss_ratio" in s:
        out.append(f"{RATIO[1]} against {RATIO[0]} calibration images: peak RSS ×{s['rss_ratio']:.2f}, "
                   f"wall time ×{s['time_ratio']:.2f}")
    if "projected_s" in s:
        out.append(f"{PROJECT} calibration images not measured; the line projects {s['projected_s']:.0f} s")
    return out


def plot(summary: dict[str, Any], out: Path) -> None:
    """Two panels, wall time and peak RSS against calibration images, one line per model."""
    from hybridquant.plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    measured = [r for r in summary["cells"] if "error" not in r]
    for model in summary["models"]:
        rows = [r for r in measured if r["model"] == model]
        if not rows:
            continue
        xs = [r["calib"] for r in rows]
        axes[0].plot(xs, [r["wall_seconds"] for r in rows], marker="o", label=model)
        axes[1].plot(xs, [r["peak_rss_mb"] for r in rows], marker="o", label=model)
    for ax, what in zip(axes, ("wall time (s)", "peak RSS (MB)"), strict=True):
        ax.set_xlabel("calibration images")
        ax.set_ylabel(what)
        ax.set_xticks(sorted({r["calib"] for r in measured}))  # linear axis: the fit is a straight line on it
        ax.set_ylim(0, 1.1 * ax.get_ylim()[1])  # from zero, so the growth reads as a proportion
        ax.legend(fontsize=8)
    size = measured[0]["img_size"]
    fig.suptitle(f"hybridquant quantize, hfq W8A8 PoT, {size}×{size} (random weights: cost only)", fontsize=10)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def summarise(out_root: Path) -> dict[str, Any] | None:
    """Write ``scale.json`` / ``scale.md`` / ``scale.png`` under ``out_root`` from the cells on disk; None
    (and nothing written) when there are none."""
    rows, evals = load_cells(out_root / "scale" / "cells")
    if not rows and not evals:
        return None
    models = list(dict.fromkeys([r["model"] for r in rows] + [e["model"] for e in evals]))
    summary = {"benchmark": "scale", "note": NOTE, "environment": environment(), "cells": rows, "eval": evals,
               "models": {m: model_summary([r for r in rows if r["model"] == m],
                                           [e for e in evals if e["model"] == m]) for m in models}}
    write_json(out_root / "scale.json", summary)
    write_text(out_root / "scale.md", markdown(summary))
    if any("error" not in r for r in rows):
        plot(summary, out_root / "scale.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(GRID), help="comma-separated timm names (default: %(default)s)")
    p.add_argument("--calib", default=None,
                   help="comma-separated calibration sizes for every model (default: each model's grid)")
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=200, help="eval images of each quantize run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="OMP / torch threads of each child (split over "
                   "the processes of a torchrun eval)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of each child (default: the "
                   "CLI's)")
    p.add_argument("--reconstruction-iters", type=int, default=None, help="hfq optimisation steps per block "
                   "(default: the method's)")
    p.add_argument("--eval-images", type=int, default=512, help="images of each eval throughput cell (0: none)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "hybridquant" / "scale"),
                   help="folder of the random-weight checkpoints")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--force", action="store_true", help="rerun cells that already have results")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the cells on disk")
    args = p.parse_args(argv)

    out_root = Path(args.out)
    cells = out_root / "scale" / "cells"
    models = args.models.split(",")
    if not args.calib and not set(models) <= set(GRID):
        p.error(f"--calib is needed for models outside the grid ({', '.join(GRID)})")
    for model in [] if args.summary_only else models:
        calibs = [int(c) for c in args.calib.split(",")] if args.calib else GRID[model]
        # (cell file, the run that fills it given the checkpoint)
        todo = [(cells / f"{model}_c{c}.json", partial(quantize_cell, args, model, c)) for c in calibs]
        if args.eval_images:
            todo += [(cells / f"eval_{model}_p{n}.json", partial(eval_cell, args, model, n)) for n in PROCS]
        for path, run in todo:
            if path.exists() and not args.force:
                print(f"{path.stem}: on disk, skipped", file=sys.stderr)
                continue
            print(f"{path.stem}: running", file=sys.stderr)
            row = run(checkpoint(Path(args.cache), model))
            write_json(path, row)
            print(f"{path.stem}: " + (f"failed: {_last_line(row['error'])}" if "error" in row
                                      else f"{row['wall_seconds']} s wall, {row['max_rss_mb']} MB max RSS"),
                  file=sys.stderr)
    if summarise(out_root) is None:
        print(f"no cells under {cells}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

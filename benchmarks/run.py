"""Accuracy benchmarks of hybridquant's methods on one model, resumable.

Suites (each cell is one quantization of the same model, data and
calibration images; each writes its own JSON, so an interrupted run resumes
where it stopped):

* ``baselines`` — every method at W8A8, W6A6 and W4A8 with float and
  power-of-two scales (the README's method table).
* ``ablation`` — hfq with each part switched off, at W8A8, W6A6 and W4A8
  with power-of-two scales (the README's "Why hfq" table).
* ``core`` — hfq, min-max and hyq with power-of-two scales at W8A8, W6A6 and
  W4A8, hfq at W8A6 and W6A8 (which side limits W6A6) and at W16A8 and W8A16
  (which side limits W8A8), plus the W16A16 wiring check.
* ``limits`` — what limits hfq at W6A6: the same run with one group of
  activation quantizers left in float (``float_ops``; the rest of the
  method re-adapts to it), so each row's gain over "all quantized" is what
  that group's 6-bit quantization costs.
* ``peers`` — hfq next to the tools users would pick instead (torchao PT2E,
  Brevitas, AMD Quark, Sony MCT, NNCF; ``benchmarks/peers/``), each
  quantizing the same model on the same calibration images and evaluated as
  its own quantized model on the same eval images, at W8A8, W6A6 and W4A8
  with power-of-two and float scales; cells ``<tool>_<setting>_<pot|float>``.
  A setting a tool cannot express, or a tool that fails or is missing, is a
  cell with ``error`` and no top-1. Needs the ``peers`` extra, best in its
  own venv: ``python -m venv .venv-peers && .venv-peers/bin/pip install -e '.[peers]'``.

Usage::

    python benchmarks/run.py --suite baselines --model mobilevit_xxs.cifar10 --data ../shared/data/cifar10
    .venv-peers/bin/python benchmarks/run.py --suite peers --model mobilevit_xxs.cifar10 --data ../shared/data/cifar10

Writes ``benchmarks/results/<suite>/<model>/<cell>.json`` and the summary
``benchmarks/results/<suite>_<model>.{json,md}`` with the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hybridquant._io import write_json, write_text
from hybridquant.config import QuantConfig
from hybridquant.data import DataOverrides
from hybridquant.pipeline import DataSpec, Prepared, fp32_result, prepare, run_config
from hybridquant.report import environment, markdown_table

BASELINE_METHODS = ("minmax", "percentile", "omse", "fq-vit", "smoothquant", "hyq", "ptq4vit", "repq-vit", "hfq")
ABLATIONS: dict[str, dict[str, Any]] = {
    "hfq (full)": {},
    "no outlier scaling": {"outlier_scaling": False},
    "no channel shift": {"channel_shift": False},
    "no LayerNorm PTF": {"ptf": False},
    "no LUT-input threshold grid": {"lut_thresholds": False},
    "no LUT-input zero point": {"lut_zero_point": False},
    "alpha float": {"alpha_pot": False},
    "PoT round (no objective search)": {"pot_rounding": "round"},
    "PoT ceil (no objective search)": {"pot_rounding": "ceil"},
    "no weight rounding": {"weight_rounding": False},
    "no input-error compensation": {"input_compensation": False},
    "no bias correction": {"bias_correction": False},
    "no block reconstruction": {"reconstruction": False},
    "2 shift terms": {"shift_terms": 2},
}

#: activation groups of the ``limits`` suite, as ``float_ops`` globs on mobilevit node names
FLOAT_GROUPS: dict[str, tuple[str, ...]] = {
    "all quantized": (),
    "input image": ("input",),
    "residual adds": ("*add*",),
    "LayerNorm outputs": ("*norm*",),
    "attention": ("*attn*",),
    "transformer MLPs": ("*mlp*",),
    "MV2 bottleneck convs": ("stages.*.conv1_1x1*", "stages.*.conv2_kxk*", "stages.*.conv3_1x1*"),
}


def _setting(name: str) -> tuple[int, int]:
    w, a = name.upper().lstrip("W").split("A")
    return int(w), int(a)


def _peers():
    """The peer-tool adapters (``benchmarks/peers``), imported only for the peers suite."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import peers

    return peers


def cells(suite: str) -> list[tuple[str, Any]]:
    """(cell id, config) of every run in ``suite``; for ``peers`` the config is (tool, wbits, abits, pot)."""
    out: list[tuple[str, Any]] = []
    if suite == "peers":
        return _peers().cells()
    if suite == "baselines":
        for setting in ("W8A8", "W6A6", "W4A8"):
            wb, ab = _setting(setting)
            for scales in ("float", "pot"):
                for method in BASELINE_METHODS:  # each method's own PoT rounding (QuantConfig resolves it)
                    cfg = QuantConfig(method=method, wbits=wb, abits=ab, scales=scales)
                    out.append((f"{method}_{setting}_{scales}", cfg))
    elif suite == "ablation":
        for setting in ("W8A8", "W6A6", "W4A8"):
            wb, ab = _setting(setting)
            for label, changes in ABLATIONS.items():
                cfg = QuantConfig(method="hfq", wbits=wb, abits=ab, scales="pot").replace(**changes)
                out.append((f"{label.replace(' ', '-').replace('(', '').replace(')', '')}_{setting}", cfg))
    elif suite == "limits":
        for label, patterns in FLOAT_GROUPS.items():
            cfg = QuantConfig(method="hfq", wbits=6, abits=6, scales="pot", float_ops=patterns)
            out.append((f"hfq_W6A6_float-{label.replace(' ', '-')}", cfg))
    elif suite == "core":
        out.append(("minmax_W16A16_float", QuantConfig(method="minmax", wbits=16, abits=16, scales="float")))
        for setting in ("W8A8", "W6A6", "W4A8"):
            wb, ab = _setting(setting)
            for method in ("minmax", "hyq", "hfq"):
                out.append((f"{method}_{setting}_pot", QuantConfig(method=method, wbits=wb, abits=ab, scales="pot")))
        # which side limits W6A6 (6-bit activations alone, 6-bit weights alone) and W8A8 (8-bit activations
        # alone, 8-bit weights alone)
        for setting in ("W8A6", "W6A8", "W16A8", "W8A16"):
            wb, ab = _setting(setting)
            out.append((f"hfq_{setting}_pot", QuantConfig(method="hfq", wbits=wb, abits=ab, scales="pot")))
    else:
        raise SystemExit(f"unknown suite '{suite}'")
    return out


KEYS = ("method", "wbits", "abits", "scales", "fp32_top1", "quant_top1", "drop_pp", "drop_ci95_pp",
        "fp32_only_correct", "quant_only_correct", "agreement_fp32", "param_increase_pct", "all_scales_pot",
        "eval_images", "calib_images", "quantize_seconds", "seconds", "peak_rss_mb", "phases")


PEER_KEYS = ("tool", "version", "wbits", "abits", "scales", "fp32_top1", "quant_top1", "drop_pp", "agreement_fp32",
             "quantize_seconds", "eval_images", "calib_images", "config", "error")


def run_peer_cell(prep: Prepared, cid: str, spec: tuple[str, int, int, bool], batch_size: int,
                  eval_data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """One peers cell: the tool's own quantized model, evaluated on the prepared eval images ``eval_data``
    (``prep.eval_tensors()``: the tools take tensors, so this suite holds the eval split in memory)."""
    tool, wbits, abits, pot = spec
    images, labels = eval_data
    fp32 = fp32_result(prep, batch_size, progress=False)
    result = _peers().TOOLS[tool](prep.loaded.model, prep.calib, images, labels,
                                  wbits, abits, pot, fp32_predictions=fp32.predictions)
    result.update({"fp32_top1": fp32.top1, "eval_images": int(images.shape[0]),
                   "calib_images": int(prep.calib.shape[0])})
    quant = result["quant_top1"]
    result["drop_pp"] = round(100.0 * (fp32.top1 - quant), 4) if quant is not None else None
    return {"cell": cid, **{k: result.get(k) for k in PEER_KEYS},
            **{k: v for k, v in result.items() if k not in PEER_KEYS}, "environment": environment()}


def _summarise_peers(model: str, rows: list[dict[str, Any]]) -> list[str]:
    shown = []
    for r in rows:
        row = {k: ("—" if v is None else v) for k, v in r.items()}
        row["setting"] = f"W{r['wbits']}A{r['abits']}"
        row["top1_pct"] = "—" if r["quant_top1"] is None else round(100 * r["quant_top1"], 2)
        row["error"] = (r["error"] or "").replace("|", "/")
        shown.append(row)
    cols = ["cell", "tool", "version", "setting", "scales", "top1_pct", "drop_pp", "agreement_fp32", "quantize_seconds",
            "error"]
    configs = {}
    for r in rows:  # one line per tool and scale kind, from its first cell that ran
        if r["error"] is None:
            configs.setdefault((r["tool"], r["scales"]), r["config"])
    return [f"# peers: {model}", "",
            f"FP32 top-1: {100 * rows[0]['fp32_top1']:.2f} % on {rows[0]['eval_images']} images; "
            f"{rows[0]['calib_images']} calibration images (the same for every tool). Each tool's own quantized "
            "model is evaluated; a cell with an error could not run (— for its numbers).", "",
            markdown_table(shown, cols, ["cell", "tool", "version", "setting", "scales", "top-1 %", "drop (pp)",
                                         "agreement", "quantize s", "error"]),
            "", "## Configurations", "",
            "The first setting each tool ran; the others change only the bit widths (the full string is in each "
            "cell's JSON).", "",
            *[f"- **{tool}**, {scales} scales: {cfg}" for (tool, scales), cfg in configs.items()]]


def summarise(suite: str, model: str, rows: list[dict[str, Any]], out_root: Path) -> None:
    """Write the suite's summary JSON and Markdown table."""
    summary = {"suite": suite, "model": model, "environment": environment(), "rows": rows}
    stem = f"{suite}_{model.replace('/', '_')}"
    write_json(out_root / f"{stem}.json", summary)
    if suite == "peers":
        md = _summarise_peers(model, rows)
        md += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items()), ""]
        write_text(out_root / f"{stem}.md", "\n".join(md))
        return
    for r in rows:
        r["setting"] = f"W{r['wbits']}A{r['abits']}"
        r["top1_pct"] = round(100 * r["quant_top1"], 2)
    cols = ["cell", "setting", "scales", "top1_pct", "drop_pp", "agreement_fp32", "param_increase_pct", "quantize_seconds"]
    md = [f"# {suite}: {model}", "", f"FP32 top-1: {100 * rows[0]['fp32_top1']:.2f} % on {rows[0]['eval_images']} images; "
          f"{rows[0]['calib_images']} calibration images.", "",
          markdown_table(rows, cols, ["cell", "setting", "scales", "top-1 %", "drop (pp)", "agreement", "param +%", "quantize s"]),
          "", "Environment: " + ", ".join(f"{k} {v}" for k, v in summary["environment"].items()), ""]
    write_text(out_root / f"{stem}.md", "\n".join(md))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["baselines", "ablation", "core", "limits", "peers"], required=True)
    p.add_argument("--model", default="mobilevit_xxs.cifar10")
    p.add_argument("--checkpoint", default=None, help="weights for --model (a timm name); results are filed "
                   "under <model>.<checkpoint file stem> unless --label says otherwise")
    p.add_argument("--label", default=None, help="name of the results (default: the model, or model.checkpoint)")
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset (default: all)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching cells")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rerun cells that already have results")
    args = p.parse_args(argv)

    out_root = Path(args.out)
    label = args.label or (f"{args.model}.{Path(args.checkpoint).stem}" if args.checkpoint else args.model)
    cell_dir = out_root / args.suite / label.replace("/", "_")
    todo = [(cid, cfg) for cid, cfg in cells(args.suite)
            if not args.only or any(s in cid for s in args.only.split(","))]
    torch.manual_seed(args.seed)
    data = DataSpec(args.data, DataOverrides(), args.limit, args.calib, args.batch_size, args.workers, args.seed)
    prep = peer_eval = None
    for cid, cfg in tqdm(todo, desc=f"{args.suite}", file=sys.stdout):
        path = cell_dir / f"{cid}.json"
        if path.exists() and not args.force:
            continue
        if prep is None:
            prep = prepare(args.model, args.checkpoint, False, data, progress=False)
            if args.suite == "peers":  # the tools take tensors: read the eval split once for every cell
                peer_eval = prep.eval_tensors(args.batch_size)
        t = time.perf_counter()
        if args.suite == "peers":
            row = run_peer_cell(prep, cid, cfg, args.batch_size, peer_eval)
            row["wall_seconds"] = round(time.perf_counter() - t, 2)
            write_json(path, row)
            tqdm.write(f"{cid}: " + (f"top1 {100 * row['quant_top1']:.2f} (agreement {row['agreement_fp32']:.4f}, "
                                     f"{row['quantize_seconds']} s)" if row["error"] is None else row["error"]),
                       file=sys.stdout)
            continue
        report, _, _ = run_config(prep, cfg, args.batch_size, progress=False)
        row = {"cell": cid, **{k: report[k] for k in KEYS}, "config": cfg.to_dict(),
               "method_info": report["method_info"], "environment": report["environment"],
               "wall_seconds": round(time.perf_counter() - t, 2)}
        write_json(path, row)
        tqdm.write(f"{cid}: top1 {100 * row['quant_top1']:.2f} (drop {row['drop_pp']:.2f} pp, "
                   f"agreement {row['agreement_fp32']:.4f})", file=sys.stdout)
    # the summary covers every cell of the suite computed so far, in suite order
    rows = [json.loads((cell_dir / f"{cid}.json").read_text()) for cid, _ in cells(args.suite)
            if (cell_dir / f"{cid}.json").exists()]
    if rows:
        summarise(args.suite, label, rows, out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which timm hybrids hybridquant takes all the way to the integer program (the README's support matrix).

For every timm model whose name matches a family glob (``mobilevit*``, ``efficientformer*``,
``efficientvit_m*``, ``fastvit*``), with random weights at a small input size: build it
(``hybridquant.models.load_model``), capture it, quantize it (min-max W8A8, power-of-two scales, a few random
calibration images), lower it to the integer program, and run one image through the program and the
simulation. Each model's row says how far it got and, where it stopped, the one-line message naming the op and
the node. Random weights are enough: what lowers depends on the ops, not on their values.

Usage::

    python benchmarks/support.py                 # every matching model (about 35)
    python benchmarks/support.py --models efficientvit_m0 fastvit_t8

Writes ``benchmarks/results/support.json`` and ``benchmarks/results/support.md`` with the environment.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path
from typing import Any

# torch, timm and hybridquant are imported where they run: benchmarks/readme_tables.py renders this script's table
# (markdown) from the JSON without them

#: the hybrid families the matrix covers, by timm name glob
FAMILIES = {"mobilevit*": "MobileViT v1/v2", "efficientformer*": "EfficientFormer V1/V2",
            "efficientvit_m*": "EfficientViT-M", "fastvit*": "FastViT"}
#: the stages a model passes, in order; its ``reached`` is the last one it completed
STAGES = ("build", "capture", "quantize", "lower", "exact")
IMG = 64  # the smallest size every family takes (MobileViT's last stage then works on 2x2 maps)


def family(name: str) -> str:
    return next(label for glob, label in FAMILIES.items() if fnmatch.fnmatch(name, glob))


def models() -> list[str]:
    """Every timm model name matching a family glob, in family order."""
    import timm

    return [n for glob in FAMILIES for n in timm.list_models(glob)]


def _one_line(exc: BaseException) -> str:
    from hybridquant.errors import HybridQuantError

    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and not isinstance(exc, HybridQuantError) else (
        text[0] if text else type(exc).__name__)


def _runs_at(model, img: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img, img))
        return True
    except RuntimeError:
        return False


def check(name: str, img: int = IMG, calib: int = 2) -> dict[str, Any]:
    """How far ``name`` gets towards the integer program (``reached``: the last stage of :data:`STAGES` it
    passed; ``error``: the one-line message where it stopped)."""
    import timm
    import torch

    from hybridquant.config import QuantConfig
    from hybridquant.graph import capture
    from hybridquant.integer.executor import IntegerModel
    from hybridquant.integer.lower import lower
    from hybridquant.models import load_model
    from hybridquant.quantize import quantize_graph

    row: dict[str, Any] = {"model": name, "family": family(name), "img_size": img, "reached": None, "error": None}
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    try:
        model = load_model(name, num_classes=10, img_size=img).model
        if not _runs_at(model, img):  # sized for its own input only (EfficientFormer V1's last attention)
            img = int(timm.get_pretrained_cfg(name).input_size[-1])
            row["img_size"] = img
            model = load_model(name, num_classes=10, img_size=img).model
        x = torch.rand(calib, 3, img, img, generator=gen) * 4 - 2
        row["params"] = sum(p.numel() for p in model.parameters())
        row["reached"] = "build"
        graph = capture(model, (3, img, img))
        row["nodes"], row["ops"] = len(graph), sorted({n.op for n in graph})
        row["reached"] = "capture"
        qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
        row["reached"] = "quantize"
        program = lower(qg)
        row["program_ops"] = len(program.ops)
        row["reached"] = "lower"
        logits, _ = IntegerModel(program).run(x[:1])
        if not torch.equal(logits, qg.run(x[:1])):
            raise AssertionError("the integer program differs from the simulation")
        row["reached"] = "exact"
    except Exception as exc:  # a model that stops anywhere is a row of the matrix, not a crash
        row["error"] = _one_line(exc)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    full = [r for r in rows if r["reached"] == "exact"]
    lines = [f"{len(full)} of {len(rows)} timm hybrids lower fully to the integer program (random weights, "
             f"{IMG}×{IMG} unless a model runs only at its own input size, min-max W8A8 power-of-two; the "
             "program's logits equal the simulation's).", "",
             "| family | model | parameters | input | result | where it stops |", "|---|---|---|---|---|---|"]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f} M" if "params" in r else "–"
        stop = STAGES[STAGES.index(r["reached"]) + 1] if r["reached"] in STAGES[:-1] else STAGES[0]
        reached = "integer program, exact" if r["reached"] == "exact" else f"stops at {stop}"
        lines.append(f"| {r['family']} | `{r['model']}` | {params} | {r['img_size']} | {reached} | "
                     f"{(r['error'] or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch
    from tqdm import tqdm

    from hybridquant._io import write_json, write_text
    from hybridquant.report import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", help="timm names (default: every match of the family globs)")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or models()
    rows = [check(n) for n in tqdm(names, desc="support", mininterval=5)]
    out = Path(args.out)
    write_json(out / "support.json", {"environment": environment(), "rows": rows})
    write_text(out / "support.md", "# Support matrix\n\n" + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()

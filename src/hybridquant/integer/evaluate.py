"""Evaluate the integer program against labels and against the simulation."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from ..graph.quantized import QuantizedGraph
from .executor import IntegerModel


@torch.no_grad()
def evaluate_integer(qgraph: QuantizedGraph, loader, allow_float_multipliers: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Top-1 of the integer program, its top-1 agreement with the simulation, and the
    largest logit difference in LSBs of the output scale."""
    model = IntegerModel(qgraph, allow_float_multipliers)
    out_name = qgraph.graph.output.inputs[0]
    lsb = float(qgraph.act[qgraph.graph.producer(out_name).name].scale.max())
    hits = agree = n = 0
    max_diff = 0.0
    start = time.perf_counter()
    for x, y in tqdm(loader, desc="eval integer", disable=not progress, leave=False, mininterval=2):
        logits, _ = model.run(x)
        sim = qgraph.run(x)
        pred = logits.argmax(1)
        hits += int((pred == y).sum())
        agree += int((pred == sim.argmax(1)).sum())
        max_diff = max(max_diff, float((logits - sim).abs().max()) / lsb)
        n += len(y)
    seconds = time.perf_counter() - start
    return {
        "top1": hits / max(n, 1), "images": n, "agreement_sim": agree / max(n, 1),
        "max_logit_diff_lsb": max_diff, "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
        # real requantizations as shifts, apart from the identity ones (multiplier 1: only a saturation)
        "requant_shifts": model.stats["requant_shifts"], "requant_identity": model.stats["requant_identity"],
        "luts": model.stats["luts"],
    }

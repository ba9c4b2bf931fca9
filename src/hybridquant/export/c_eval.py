"""Evaluate the exported C program on a dataset: accuracy, agreement with the simulation and the integer
executor, the largest output difference in codes, and its speed."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..graph.quantized import QuantizedGraph
from ..integer.executor import IntegerModel
from .c import STRICT_CFLAGS, build_c, export_c, native_flag, pixels_to_images, run_c


@torch.no_grad()
def evaluate_c(qgraph: QuantizedGraph, model_meta: dict[str, Any] | None,
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Export ``qgraph`` as C, compile it (``-O3``, with this machine's vector instructions where the compiler
    takes ``-march=native``; one thread) and run it on ``batches`` of (uint8 images [B, H, W, C], labels).

    Keys: ``top1``; ``images``; ``agreement_sim`` / ``agreement_integer``: top-1 agreement with the simulation
    and with the Python integer executor on the same images; ``identical_integer``: the fraction of images
    whose output codes equal the executor's; ``max_logit_diff_lsb``: the largest difference between the C
    program's output codes and the simulation's (its logits in output steps); ``images_per_second``: images
    over the processor time spent in ``hq_run`` (no compiling, no files), ``threads``: 1.
    """
    integer = IntegerModel(qgraph)
    out_op = integer.program.ops[-1]
    scale = torch.from_numpy(np.asarray(out_op.arrays["scale"], dtype=np.float64))
    zero_point = torch.from_numpy(np.asarray(out_op.arrays["zero_point"]).astype(np.int64))
    hits = agree_sim = agree_int = identical = n = 0
    max_diff, seconds = 0, 0.0
    with tempfile.TemporaryDirectory(prefix="hq-c-") as tmp:
        export_c(qgraph, f"{tmp}/model", model_meta)
        flags = STRICT_CFLAGS + " -DHQ_TIMING" + native_flag()
        binary = build_c(f"{tmp}/model", flags)
        for pixels, labels in tqdm(batches, total=total, desc="eval C", disable=not progress, leave=False):
            px = pixels.numpy()
            codes, spent = run_c(binary, px, tmp)
            seconds += spent or 0.0
            c_codes = torch.from_numpy(codes.astype(np.int64))
            x = pixels_to_images(px, model_meta)
            _, int_codes = integer.run(x)
            int_codes = int_codes.reshape(len(px), -1)
            sim = qgraph.run(x).double()
            sim_codes = (torch.round(sim / scale) + zero_point).to(torch.int64).reshape(len(px), -1)
            pred = ((c_codes - zero_point).double() * scale).argmax(1)  # logits: a per-channel scale too
            hits += int((pred == labels).sum())
            agree_sim += int((pred == sim.reshape(len(px), -1).argmax(1)).sum())
            agree_int += int((pred == int_codes.argmax(1)).sum())
            identical += int((c_codes == int_codes).all(1).sum())
            max_diff = max(max_diff, int((c_codes - sim_codes).abs().max()))
            n += len(px)
    return {"top1": hits / max(n, 1), "images": n, "agreement_sim": agree_sim / max(n, 1),
            "agreement_integer": agree_int / max(n, 1), "identical_integer": identical / max(n, 1),
            "max_logit_diff_lsb": max_diff, "images_per_second": round(n / seconds, 1) if seconds > 0 else None,
            "threads": 1, "cflags": flags.strip()}

"""Outlier analysis: where per-tensor low-bit activation quantization hurts.

For the input of every multiply-accumulate layer (conv, linear, attention
matmul) on calibration images: max |x|, percentiles, per-channel maxima,
*channel spread* (largest channel max / median channel max), kurtosis, and
the channels flagged as outliers (max above ``OUTLIER_FACTOR`` × the median
channel max). Each conv/linear is also ranked by its output SQNR when its
input is quantized per tensor and its weights per channel (min-max), at W8A8
and W6A6 — the damage the outliers do.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from .config import QuantConfig
from .graph.ir import Graph
from .graph.stream import FloatStream, split_images
from .methods.hfq.outlier_scaling import layer_error, layer_output
from .observers import channel_dim
from .store import Workspace

OUTLIER_FACTOR = 5.0
SETTINGS = ((8, 8), (6, 6))


def _sqnr_from_rel(err: float) -> float:
    return float("inf") if err <= 0 else -10.0 * math.log10(err)


def tensor_stats(x: torch.Tensor, max_sample: int = 1 << 20) -> dict[str, Any]:
    """Statistics of one activation tensor ([B, C, ...] or [B, ..., C])."""
    dim = channel_dim(x)
    ch_absmax = x.abs().transpose(0, dim).flatten(1).max(1).values
    median = float(ch_absmax.median().clamp_min(1e-12))
    flat = x.flatten()
    if flat.numel() > max_sample:
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:max_sample]
        flat = flat[idx]
    flat = flat.double()
    centred = flat - flat.mean()
    var = centred.pow(2).mean()
    kurt = float(centred.pow(4).mean() / var.pow(2)) if var > 0 else 0.0
    q = torch.quantile(flat.abs().float(), torch.tensor([0.99, 0.999, 0.9999]))
    outliers = (ch_absmax > OUTLIER_FACTOR * median).nonzero().flatten().tolist()
    return {
        "shape": list(x.shape[1:]),
        "min": float(x.min()), "max": float(x.max()), "absmax": float(x.abs().max()),
        "p99": float(q[0]), "p99_9": float(q[1]), "p99_99": float(q[2]),
        "channels": int(ch_absmax.numel()), "channel_median_absmax": median,
        "channel_spread": float(ch_absmax.max()) / median, "kurtosis": kurt,
        "outlier_channels": outliers, "channel_absmax": [round(v, 5) for v in ch_absmax.tolist()],
    }


@torch.no_grad()
def analyze_graph(graph: Graph, images: torch.Tensor, workspace: Workspace | None = None) -> dict[str, Any]:
    """Per-layer input statistics and per-tensor quantization damage, plus a per-block summary.

    The graph is walked value by value (:class:`~hybridquant.graph.stream.FloatStream`): one layer input
    over all ``images`` is in memory at a time, besides the values the workspace keeps (a default one when
    None)."""
    ws = workspace if workspace is not None else Workspace()
    macs = graph.where(mac=True)
    readers = Counter(name for node in macs for name in node.inputs)
    stream = FloatStream(graph, split_images(graph, images, ws), ws, hold=readers)
    layers = []
    for node in macs:
        for idx, name in enumerate(node.inputs):
            readers[name] -= 1
            src = graph.producer(name)
            if src.opdef.role == "source":
                continue
            x = stream.value(name).whole()
            if readers[name] == 0:
                stream.release(name)
            row: dict[str, Any] = {
                "layer": node.name, "op": node.op, "block": node.block, "input": idx,
                "producer": src.name, "producer_op": src.op, **tensor_stats(x),
            }
            if node.opdef.weighted and idx == 0:
                out_ref = layer_output(node, x, node.params["weight"])
                for wb, ab in SETTINGS:
                    cfg = QuantConfig(method="minmax", wbits=wb, abits=ab)
                    err = layer_error(node, x, torch.ones(x.shape[node.opdef.channel_axis]), cfg, out_ref)
                    row[f"sqnr_w{wb}a{ab}_db"] = round(_sqnr_from_rel(err), 2)
            layers.append(row)
    stream.close()
    blocks: dict[str, dict[str, Any]] = {}
    for row in layers:
        b = blocks.setdefault(row["block"] or "other", {"layers": 0, "outlier_channels": 0, "max_channel_spread": 0.0,
                                                         "max_absmax": 0.0, "min_sqnr_w6a6_db": float("inf")})
        b["layers"] += 1
        b["outlier_channels"] += len(row["outlier_channels"])
        b["max_channel_spread"] = max(b["max_channel_spread"], row["channel_spread"])
        b["max_absmax"] = max(b["max_absmax"], row["absmax"])
        if "sqnr_w6a6_db" in row:
            b["min_sqnr_w6a6_db"] = min(b["min_sqnr_w6a6_db"], row["sqnr_w6a6_db"])
    ranked = sorted((r for r in layers if "sqnr_w6a6_db" in r), key=lambda r: r["sqnr_w6a6_db"])
    return {
        "images": int(images.shape[0]), "outlier_factor": OUTLIER_FACTOR, "layers": layers, "blocks": blocks,
        "worst_layers": [r["layer"] for r in ranked[:10]],
    }


def analysis_markdown(result: dict[str, Any], title: str, plots: list[str]) -> str:
    """The human-readable twin of analysis.json."""
    from .report import markdown_table

    ranked = sorted((r for r in result["layers"] if "sqnr_w6a6_db" in r), key=lambda r: r["sqnr_w6a6_db"])
    rows = [{**r, "outliers": len(r["outlier_channels"])} for r in ranked]
    blocks = [{"block": k, **v} for k, v in result["blocks"].items()]
    lines = [
        f"# Outlier analysis: {title}",
        "",
        f"{result['images']} calibration images. An outlier channel has max |x| above "
        f"{result['outlier_factor']:g}× the median channel max of its tensor.",
        "",
        "## By block kind",
        "",
        markdown_table(blocks, ["block", "layers", "outlier_channels", "max_channel_spread", "max_absmax", "min_sqnr_w6a6_db"],
                       ["block", "layer inputs", "outlier channels", "max channel spread", "max abs", "min SQNR W6A6 (dB)"]),
        "",
        "## Conv / linear layers, worst first (output SQNR with per-tensor input quantization)",
        "",
        markdown_table(rows, ["layer", "block", "producer_op", "absmax", "p99_99", "channel_spread", "kurtosis", "outliers",
                              "sqnr_w8a8_db", "sqnr_w6a6_db"],
                       ["layer", "block", "input from", "max |x|", "p99.99", "channel spread", "kurtosis", "outlier ch.",
                        "SQNR W8A8", "SQNR W6A6"]),
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"

"""End-to-end jobs shared by the CLI and the benchmarks.

``quantize_job`` loads a model and data, captures the graph, calibrates and
quantizes it, evaluates FP32 and quantized top-1 on the eval split and
returns the report, the quantized graph and the model metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig
from .data import (
    DataOverrides,
    balanced_subset,
    check_class_names,
    data_config,
    eval_transform,
    image_folder,
    make_loader,
    random_subset,
)
from .evaluate import evaluate
from .graph import capture
from .graph.ir import MAC_OPS
from .graph.quantized import QuantizedGraph
from .models import LoadedModel, load_model
from .quantize import layer_sqnr, quantize_graph
from .report import environment


@dataclass
class DataSpec:
    """Where the images are and how many to use."""

    root: str | Path
    overrides: DataOverrides = DataOverrides()
    limit: int | None = None
    calib: int = 512
    batch_size: int = 128
    workers: int = 2
    seed: int = 0


def model_meta(loaded: LoadedModel, cfg: dict[str, Any]) -> dict[str, Any]:
    """What a quantized model must remember about its float origin."""
    return {
        "name": loaded.name,
        "source": loaded.source,
        "num_classes": loaded.num_classes,
        "class_names": loaded.class_names,
        "data_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }


def load_calibration(data: DataSpec, cfg: dict[str, Any]) -> torch.Tensor:
    """``data.calib`` seeded training images, preprocessed like eval images."""
    train = image_folder(data.root, "train", eval_transform(cfg))
    subset = random_subset(train, data.calib, data.seed)
    return torch.cat([x for x, _ in make_loader(subset, data.batch_size, data.workers)])


def coverage(qgraph: QuantizedGraph) -> dict[str, int]:
    """How many MACs there are and how many run on integers."""
    macs = qgraph.graph.by_op(*MAC_OPS)
    quantized = {n.name for n in qgraph.quantized_macs()}
    out = {op: sum(1 for n in macs if n.op == op) for op in sorted(MAC_OPS)}
    out.update({"macs": len(macs), "quantized_macs": len(quantized)})
    return out


def layer_rows(qgraph: QuantizedGraph, sqnr: dict[str, float]) -> list[dict[str, Any]]:
    """One report row per quantized node."""
    rows = []
    for node in qgraph.graph:
        if node.name not in qgraph.act:
            continue
        a = qgraph.act[node.name].summary()
        row: dict[str, Any] = {
            "name": node.name, "op": node.op, "block": node.block, "act_bits": a["bits"],
            "act_scale": a.get("scale", f"{a.get('scale_min', 0):.3g}..{a.get('scale_max', 0):.3g}"),
            "act_zero_point": a.get("zero_point", 0), "act_kind": a["kind"],
            "sqnr_db": round(sqnr.get(node.name, float("nan")), 2),
        }
        if node.name in qgraph.weight:
            w = qgraph.weight[node.name].summary()
            row.update({"weight_bits": w["bits"], "weight_scale_min": w["scale_min"], "weight_scale_max": w["scale_max"]})
        rows.append(row)
    return rows


def all_scales_pot(qgraph: QuantizedGraph) -> bool:
    """True when every uniform activation and weight scale is an exact power of two."""
    qps = [q for q in qgraph.act.values() if q.kind == "uniform"] + list(qgraph.weight.values())
    return all(q.is_pot for q in qps)


def quantize_job(
    model: str,
    checkpoint: str | None,
    pretrained: bool,
    data: DataSpec,
    config: QuantConfig,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, Any], QuantizedGraph, dict[str, Any]]:
    """Quantize ``model`` on ``data`` with ``config``; returns (report, qgraph, model_meta)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    loaded = load_model(model, checkpoint, pretrained)
    cfg = data_config(loaded.data_cfg, data.overrides)
    eval_set = image_folder(data.root, "eval", eval_transform(cfg))
    check_class_names(eval_set, loaded.class_names, loaded.num_classes)
    eval_subset = balanced_subset(eval_set, data.limit)
    calib = load_calibration(data, cfg)
    times["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    graph = capture(loaded.model, tuple(cfg["input_size"]))
    times["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    qgraph = quantize_graph(graph, config, calib, progress=progress)
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    loader = make_loader(eval_subset, data.batch_size, data.workers)
    fp32 = evaluate(loaded.model.to(device), loader, device, progress=progress, desc="eval fp32")
    quant = evaluate(qgraph.run, loader, "cpu", progress=progress, desc="eval quantized")
    times["evaluate"] = time.perf_counter() - t

    sqnr = layer_sqnr(graph, qgraph, calib[: config.sqnr_images])
    meta = model_meta(loaded, cfg)
    report: dict[str, Any] = {
        "method": config.method, "wbits": config.wbits, "abits": config.abits, "scales": config.scales,
        "fp32_top1": fp32.top1, "quant_top1": quant.top1,
        "drop_pp": round(100.0 * (fp32.top1 - quant.top1), 4),
        "agreement_fp32": float((fp32.predictions == quant.predictions).float().mean()) if quant.images else 0.0,
        "fp32_top5": fp32.top5, "quant_top5": quant.top5,
        "calib_images": int(calib.shape[0]), "eval_images": quant.images,
        "param_increase_pct": round(qgraph.info.get("param_increase_pct", 0.0), 4),
        "all_scales_pot": all_scales_pot(qgraph),
        "coverage": coverage(qgraph),
        "float_nodes": list(qgraph.float_nodes),
        "method_info": qgraph.info,
        "model": meta, "config": config.to_dict(),
        "layers": layer_rows(qgraph, sqnr),
        "seconds_breakdown": {k: round(v, 2) for k, v in times.items()},
        "environment": environment(),
    }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report, qgraph, meta

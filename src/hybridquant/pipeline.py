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
from .evaluate import evaluate, paired_drop
from .graph import capture
from .graph.ir import MAC_OPS
from .graph.quantized import QuantizedGraph
from .models import LoadedModel, load_model
from .quantize import float_node_names, layer_sqnr, quantize_graph
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


def model_size_bytes(qgraph: QuantizedGraph) -> dict[str, int]:
    """Bytes of the deployed parameters at the chosen bit widths.

    Integer weights at their bit width, int32 biases, the parameters that
    stay outside the MACs (norm affines, outlier-scaling vectors) at 16 bits,
    and threshold grids' thresholds as int32.
    """
    weights = sum(qgraph.weight_int[n].numel() * qgraph.weight[n].bits for n in qgraph.weight_int) // 8
    biases = 4 * sum(b.numel() for b in qgraph.bias_int.values())
    other = 0
    for node in qgraph.graph:
        for key, t in node.params.items():
            if node.name in qgraph.weight and key in ("weight", "bias"):
                continue
            if node.name in qgraph.bias_int and key == "bias":
                continue
            if not key.startswith("running_"):
                other += 2 * t.numel()
    other += 4 * qgraph.grid_constants()
    return {"weights": weights, "biases": biases, "other": other, "total": weights + biases + other}


def integer_summary(qgraph: QuantizedGraph) -> dict[str, Any]:
    """Whether the model lowers to an integer-only, shift-requantized program, and its counts."""
    from .errors import HybridQuantError
    from .integer.executor import IntegerModel

    try:
        model = IntegerModel(qgraph)
    except HybridQuantError as exc:
        return {"integer_only": False, "reason": str(exc)}
    return {"integer_only": True, "requant_multiplies_replaced_by_shifts": model.stats["requant_shifts"],
            "lookup_tables": model.stats["luts"], "integer_op_fraction": 1.0}


def all_scales_pot(qgraph: QuantizedGraph) -> bool:
    """True when every uniform activation and weight scale is an exact power of two."""
    qps = [q for q in qgraph.act.values() if q.kind == "uniform"] + list(qgraph.weight.values())
    return all(q.is_pot for q in qps)


@dataclass
class Prepared:
    """Everything a quantization run needs that does not depend on the config."""

    loaded: LoadedModel
    cfg: dict[str, Any]
    graph: Any
    calib: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    fp32: Any
    times: dict[str, float]
    device: str = "cpu"


def prepare(model: str, checkpoint: str | None, pretrained: bool, data: DataSpec, device: str = "cpu",
            progress: bool = True) -> Prepared:
    """Load the model and images, capture the graph and evaluate FP32 once."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_model(model, checkpoint, pretrained)
    cfg = data_config(loaded.data_cfg, data.overrides)
    eval_set = image_folder(data.root, "eval", eval_transform(cfg))
    check_class_names(eval_set, loaded.class_names, loaded.num_classes)
    calib = load_calibration(data, cfg)
    batches = list(make_loader(balanced_subset(eval_set, data.limit), data.batch_size, data.workers))
    images = torch.cat([x for x, _ in batches]) if batches else torch.empty(0, *cfg["input_size"])
    labels = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.long)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = capture(loaded.model, tuple(cfg["input_size"]))
    times["capture"] = time.perf_counter() - t
    return Prepared(loaded, cfg, graph, calib, images, labels, None, times, device)


def fp32_result(prep: Prepared, batch_size: int = 128, progress: bool = True):
    """FP32 evaluation of the original model, computed once per :class:`Prepared`."""
    if prep.fp32 is None:
        t = time.perf_counter()
        prep.fp32 = evaluate(prep.loaded.model.to(prep.device), _tensor_loader(prep.eval_images, prep.eval_labels, batch_size),
                             prep.device, progress=progress, desc="eval fp32")
        prep.times["eval_fp32"] = time.perf_counter() - t
    return prep.fp32


def _tensor_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def run_config(prep: Prepared, config: QuantConfig, batch_size: int = 128,
               progress: bool = True) -> tuple[dict[str, Any], QuantizedGraph, dict[str, Any]]:
    """Quantize the prepared graph with ``config`` and evaluate it; returns (report, qgraph, meta)."""
    t0 = time.perf_counter()
    float_node_names(prep.graph, config.float_ops)  # fail on a bad pattern before any long work
    fp32 = fp32_result(prep, batch_size, progress)
    times = dict(prep.times)
    t = time.perf_counter()
    qgraph = quantize_graph(prep.graph, config, prep.calib, progress=progress)
    times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    quant = evaluate(qgraph.run, _tensor_loader(prep.eval_images, prep.eval_labels, batch_size), "cpu",
                     progress=progress, desc="eval quantized")
    times["eval_quant"] = time.perf_counter() - t
    sqnr = layer_sqnr(prep.graph, qgraph, prep.calib[: config.sqnr_images])
    meta = model_meta(prep.loaded, prep.cfg)
    report: dict[str, Any] = {
        "method": config.method, "wbits": config.wbits, "abits": config.abits, "scales": config.scales,
        "fp32_top1": fp32.top1, "quant_top1": quant.top1,
        "drop_pp": round(100.0 * (fp32.top1 - quant.top1), 4),
        "agreement_fp32": float((fp32.predictions == quant.predictions).float().mean()) if quant.images else 0.0,
        # the drop's 95 % interval over these eval images, from the images only one of the two gets right
        **paired_drop(fp32.predictions == prep.eval_labels, quant.predictions == prep.eval_labels),
        "fp32_top5": fp32.top5, "quant_top5": quant.top5,
        "calib_images": int(prep.calib.shape[0]), "eval_images": quant.images,
        "param_increase_pct": round(qgraph.info.get("param_increase_pct", 0.0), 4),
        "all_scales_pot": all_scales_pot(qgraph),
        "coverage": coverage(qgraph),
        "integer": integer_summary(qgraph),
        "model_size_bytes": model_size_bytes(qgraph),
        "float_nodes": list(qgraph.float_nodes),
        "method_info": qgraph.info,
        "model": meta, "config": config.to_dict(),
        "layers": layer_rows(qgraph, sqnr),
        "seconds_breakdown": {k: round(v, 2) for k, v in times.items()},
        "environment": environment(),
    }
    # one run's wall time: loading, capture and FP32 eval (shared) plus this config's work
    report["seconds"] = round(sum(v for k, v in prep.times.items() if k != "eval_fp32") + time.perf_counter() - t0, 2)
    report["quantize_seconds"] = round(times["quantize"], 2)
    return report, qgraph, meta


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
    prep = prepare(model, checkpoint, pretrained, data, device, progress)
    return run_config(prep, config, data.batch_size, progress)

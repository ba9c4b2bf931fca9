"""End-to-end jobs shared by the CLI and the benchmarks.

``quantize_job`` loads a model and data, captures the graph, calibrates and
quantizes it, evaluates FP32 and quantized top-1 on the eval split and
returns the report, the quantized graph and the model metadata.
"""

from __future__ import annotations

import math
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


#: why a layer row has no SQNR (JSON ``sqnr_note``; report.md footnotes)
SQNR_EXACT = "exact on these images: the quantized output equals the float one (no noise, SQNR infinite)"
SQNR_ZERO = "the float output is zero on these images: no signal to compare with"
SQNR_MISSING = "no float value to compare with"


def _sqnr_cell(value: float | None, refined: float | None, kind: str = "uniform") -> tuple[float | None, str | None]:
    """A row's (sqnr_db, note): a finite SQNR (full precision), or None and the reason; a note also explains
    an SQNR below 0 dB."""
    if value is None or math.isnan(value):
        return None, SQNR_MISSING
    if math.isinf(value):
        return None, SQNR_EXACT if value > 0 else SQNR_ZERO
    note = None
    if value < 0:
        if kind == "threshold":
            note = ("below 0 dB on a threshold grid: its codes are placed for the lookup table it feeds (the "
                    "table's row measures the error that matters); a code's representative value is not meant "
                    "to approximate the input")
        elif refined is not None and math.isfinite(refined) and refined >= 0:
            note = (f"below 0 dB from the method's refinement, not from this node's quantization: GPTQ, bias "
                    f"correction and block reconstruction fit weights and biases to a later output (e.g. a bias "
                    f"shift through attention that the next bias cancels), so this inner value leaves the float "
                    f"model's; against those refined float parameters it is {refined:.1f} dB")
        else:
            note = "below 0 dB: the quantization noise exceeds this output's signal"
    return value, note


def layer_rows(qgraph: QuantizedGraph, sqnr: dict[str, float],
               refined: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One report row per quantized node.

    ``sqnr_db``: against the transformed float graph (:func:`~hybridquant.quantize.layer_sqnr`); None with a
    ``sqnr_note`` saying why where there is no finite value, and a note too under 0 dB. ``sqnr_refined_db``
    (when ``refined`` is given): against the float parameters after the method's refinement.
    """
    rows = []
    refined = refined or {}
    for node in qgraph.graph:
        if node.name not in qgraph.act:
            continue
        a = qgraph.act[node.name].summary()
        value, note = _sqnr_cell(sqnr.get(node.name), refined.get(node.name), a["kind"])
        row: dict[str, Any] = {
            "name": node.name, "op": node.op, "block": node.block, "act_bits": a["bits"],
            # per tensor: the scale; per channel: [smallest, largest]
            "act_scale": a["scale"] if "scale" in a else [a.get("scale_min", 0.0), a.get("scale_max", 0.0)],
            "act_zero_point": a.get("zero_point", 0), "act_kind": a["kind"],
            "sqnr_db": value,
        }
        if note is not None:
            row["sqnr_note"] = note
        if node.name in refined and math.isfinite(refined[node.name]):
            row["sqnr_refined_db"] = refined[node.name]
        if node.name in qgraph.weight:
            w = qgraph.weight[node.name].summary()
            row.update({"weight_bits": w["bits"], "weight_scale_min": w["scale_min"], "weight_scale_max": w["scale_max"]})
        rows.append(row)
    return rows


def estimated_size(qgraph: QuantizedGraph) -> dict[str, int]:
    """Bytes of a model that has no integer program (float scales, float nodes), estimated from the graph:
    weights packed at their bit width, int32 (int64) biases, int32 thresholds, every other parameter (norm
    affines, outlier-scaling vectors) at 16 bits; requantization constants and lookup tables are not
    counted (they depend on a lowering the model does not have)."""
    from .graph.quantized import accumulator_bits
    from .integer.executor import packed_nbytes

    weights = sum(packed_nbytes(q.numel(), qgraph.weight[n].bits) for n, q in qgraph.weight_int.items())
    biases = 0
    for name, b in qgraph.bias_int.items():
        x_qp = qgraph.input_qparams(qgraph.graph[name])
        biases += b.numel() * accumulator_bits(x_qp.bits, qgraph.weight[name].bits) // 8
    other = 0
    for node in qgraph.graph:
        for key, t in node.params.items():
            if node.name in qgraph.weight and key in ("weight", "bias"):
                continue
            if node.name in qgraph.bias_int and key == "bias":
                continue
            if not key.startswith("running_"):
                other += 2 * t.numel()
    return {"weights": weights, "biases": biases, "thresholds": 4 * qgraph.grid_constants(),
            "other_params_16bit": other}


def integer_summary(qgraph: QuantizedGraph) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(integer, size)``: what the lowered program is made of, and what the hardware stores.

    ``integer``: whether the model lowers to an integer-only, shift-requantized program; its requantizations
    (real ones as shifts apart from identity ones, multiplier exactly 1), lookup tables, and the fraction of
    its ops (and of its MACs) on integer kernels, measured on the lowered program
    (:meth:`~hybridquant.integer.executor.IntegerModel.op_counts`). ``size``: ``deployed_bytes``, its
    ``deployed_bytes_breakdown`` and ``host_bytes`` (:meth:`~hybridquant.integer.executor.IntegerModel.storage`:
    the constants of the lowered program, sub-8-bit weights packed, exactly what the exports store), or
    for a model without an integer program an estimate (:func:`estimated_size`); ``deployed_bytes_basis``
    says which.
    """
    from .errors import HybridQuantError
    from .integer.executor import IntegerModel

    def counts(model: IntegerModel) -> dict[str, Any]:
        st = model.stats
        return {"requant_multiplies_replaced_by_shifts": st["requant_shifts"],
                "identity_requantizations": st["requant_identity"],
                "two_term_requantizations": st["requant_two_term"],
                "threshold_requantizations": st["requant_threshold"],
                "float_requantizations": st["requant_float"],
                "lookup_tables": st["luts"], **model.op_counts()}

    try:
        model = IntegerModel(qgraph)
    except HybridQuantError as exc:
        integer: dict[str, Any] = {"integer_only": False, "reason": str(exc)}
        try:  # float multipliers the only obstacle: the program exists, with float requantizations
            integer.update(counts(IntegerModel(qgraph, allow_float_multipliers=True)))
        except HybridQuantError:
            integer.update({"integer_op_fraction": None, "integer_mac_fraction": None})
        breakdown = estimated_size(qgraph)
        return integer, {"deployed_bytes": sum(breakdown.values()), "deployed_bytes_breakdown": breakdown,
                         "host_bytes": 0,
                         "deployed_bytes_basis": f"estimate from the quantized graph (no integer program: {exc})"}
    storage = model.storage()
    return {"integer_only": True, **counts(model)}, {
        "deployed_bytes": storage["deployed_bytes"], "deployed_bytes_breakdown": storage["breakdown"],
        "host_bytes": storage["host_bytes"], "deployed_bytes_basis": "lowered integer program"}


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
    sqnr_images = prep.calib[: config.sqnr_images]
    sqnr = layer_sqnr(qgraph, sqnr_images)  # against the transformed float graph (qgraph.reference)
    refined = layer_sqnr(qgraph, sqnr_images, reference=qgraph.graph) if qgraph.reference is not None else None
    integer, size = integer_summary(qgraph)
    meta = model_meta(prep.loaded, prep.cfg)
    report: dict[str, Any] = {
        "method": config.method, "wbits": config.wbits, "abits": config.abits, "scales": config.scales,
        "fp32_top1": fp32.top1, "quant_top1": quant.top1,
        "drop_pp": round(100.0 * (fp32.top1 - quant.top1), 10),  # without float noise (0.0199999…); report.md rounds
        "agreement_fp32": float((fp32.predictions == quant.predictions).float().mean()) if quant.images else 0.0,
        # the drop's 95 % interval over these eval images, from the images only one of the two gets right
        **paired_drop(fp32.predictions == prep.eval_labels, quant.predictions == prep.eval_labels),
        "fp32_top5": fp32.top5, "quant_top5": quant.top5,
        "calib_images": int(prep.calib.shape[0]), "eval_images": quant.images,
        "param_increase_pct": qgraph.info.get("param_increase_pct", 0.0),
        "all_scales_pot": all_scales_pot(qgraph),
        "coverage": coverage(qgraph),
        "integer": integer,
        **size,
        "float_nodes": list(qgraph.float_nodes),
        "method_info": qgraph.info,
        "model": meta, "config": config.to_dict(),
        "sqnr_images": int(sqnr_images.shape[0]),
        "layers": layer_rows(qgraph, sqnr, refined),
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

"""End-to-end jobs shared by the CLI and the benchmarks.

``quantize_job`` loads a model and data, captures the graph, calibrates and
quantizes it, evaluates FP32 and quantized top-1 on the eval split and
returns the report, the quantized graph and the model metadata.

The eval split is never held in memory: each evaluation streams it from a
DataLoader, and only labels and top-1 predictions (one integer per image)
are kept. Every phase's wall time and peak resident memory go into the
report (:mod:`hybridquant.phases`).

Under ``torchrun`` the evaluations are split over the ranks
(:func:`~hybridquant.evaluate.evaluate_sharded`: every image counted once,
the same predictions as one process); calibration runs whole on every rank,
so every rank builds the same model.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

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
from .distributed import world_size
from .evaluate import EvalResult, evaluate_sharded, paired_drop
from .graph import capture
from .graph.quantized import QuantizedGraph
from .models import LoadedModel, load_model
from .ops import ops_where
from .phases import Phases, current, phase
from .quantize import float_node_names, layer_sqnr, quantize_graph
from .report import environment
from .store import Workspace


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


def _stack_images(loader: DataLoader, count: int, desc: str, progress: bool = True) -> torch.Tensor:
    """The ``count`` images of ``loader`` in one tensor, filled batch by batch (no second copy)."""
    out: torch.Tensor | None = None
    i = 0
    for x, _ in tqdm(loader, total=len(loader), desc=desc, disable=not progress, leave=False, mininterval=2):
        if out is None:
            out = x.new_empty((count, *x.shape[1:]))
        out[i:i + len(x)] = x
        i += len(x)
    return out if out is not None else torch.empty(0)


def load_calibration(data: DataSpec, cfg: dict[str, Any], progress: bool = True) -> torch.Tensor:
    """``data.calib`` seeded training images, preprocessed like eval images."""
    train = image_folder(data.root, "train", eval_transform(cfg))
    subset = random_subset(train, data.calib, data.seed)
    return _stack_images(make_loader(subset, data.batch_size, data.workers), len(subset), "load calibration", progress)


def coverage(qgraph: QuantizedGraph) -> dict[str, int]:
    """How many MACs there are and how many run on integers."""
    macs = qgraph.graph.where(mac=True)
    quantized = {n.name for n in qgraph.quantized_macs()}
    out = dict.fromkeys(sorted(ops_where(mac=True)), 0)  # every MAC op kind, present or not
    for n in macs:
        out[n.op] += 1
    out.update({"macs": len(macs), "quantized_macs": len(quantized)})
    return out


#: why a layer row has no SQNR (JSON ``sqnr_note``; report.md footnotes)
SQNR_EXACT = "exact on these images: the quantized output equals the float one (no noise, SQNR infinite)"
SQNR_ZERO = "the float output is zero on these images: no signal to compare with"
SQNR_MISSING = "no float value to compare with"


def _sqnr_cell(value: float | None, refined: float | None, grid: str = "uniform") -> tuple[float | None, str | None]:
    """A row's (sqnr_db, note): a finite SQNR (full precision), or None and the reason; a note also explains
    an SQNR below 0 dB."""
    if value is None or math.isnan(value):
        return None, SQNR_MISSING
    if math.isinf(value):
        return None, SQNR_EXACT if value > 0 else SQNR_ZERO
    note = None
    if value < 0:
        if grid == "threshold":
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
        value, note = _sqnr_cell(sqnr.get(node.name), refined.get(node.name), a["grid"])
        row: dict[str, Any] = {
            "name": node.name, "op": node.op, "block": node.block, "act_bits": a["bits"],
            # per tensor: the scale; per channel: [smallest, largest]
            "act_scale": a["scale"] if "scale" in a else [a.get("scale_min", 0.0), a.get("scale_max", 0.0)],
            "act_zero_point": a.get("zero_point", 0), "act_grid": a["grid"],
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
    from .integer.program import packed_nbytes

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
    (:meth:`~hybridquant.integer.program.Program.op_counts`). ``size``: ``deployed_bytes``, its
    ``deployed_bytes_breakdown`` and ``host_bytes`` (:meth:`~hybridquant.integer.program.Program.storage`:
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
    qps = [q for q in qgraph.act.values() if q.grid == "uniform"] + list(qgraph.weight.values())
    return all(q.is_pot for q in qps)


def _labels(dataset: Dataset) -> torch.Tensor:
    """The class ids of an ImageFolder (or a Subset of one) in loader order, without reading an image."""
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    return torch.as_tensor(dataset.targets, dtype=torch.long)


@dataclass
class Prepared:
    """Everything a quantization run needs that does not depend on the config.

    ``eval_set`` is the eval split (the class-balanced subset of ``--limit``): evaluations stream it
    (:meth:`eval_loader`); only its ``eval_labels`` are in memory. ``phases`` / ``peak_rss_mb``: what
    loading, capture and the FP32 evaluation took (``report.json``'s ``phases``).
    """

    loaded: LoadedModel
    cfg: dict[str, Any]
    graph: Any
    calib: torch.Tensor
    eval_set: Dataset
    eval_labels: torch.Tensor
    workers: int = 0
    device: str = "cpu"
    fp32: EvalResult | None = None
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def eval_loader(self, batch_size: int) -> DataLoader:
        """The eval images in file order, ``batch_size`` at a time."""
        return make_loader(self.eval_set, batch_size, self.workers)

    def eval_tensors(self, batch_size: int = 128, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the whole eval split in memory — only for the benchmark callers that hand
        tensors to other tools (the peers suite); at 256×256, 10,000 images take ~7.9 GB."""
        images = _stack_images(self.eval_loader(batch_size), len(self.eval_labels), "load eval images", progress)
        return images, self.eval_labels


@contextmanager
def _recorder(progress: bool) -> Iterator[Phases]:
    """The current run's recorder, or a new one for this work alone (one recorder at a time: each resets
    the kernel's peak-memory mark)."""
    rec = current()
    if rec is not None:
        yield rec
        return
    with Phases(progress=progress) as rec:
        yield rec


def prepare(model: str, checkpoint: str | None, pretrained: bool, data: DataSpec, device: str = "cpu",
            progress: bool = True) -> Prepared:
    """Load the model and the calibration images, capture the graph; the eval split stays on disk."""
    with Phases(progress=progress) as rec:
        with phase("load"):
            loaded = load_model(model, checkpoint, pretrained, img_size=data.overrides.img_size)
            cfg = data_config(loaded.data_cfg, data.overrides)
            eval_set = image_folder(data.root, "eval", eval_transform(cfg))
            check_class_names(eval_set, loaded.class_names, loaded.num_classes)
            eval_set = balanced_subset(eval_set, data.limit)
        with phase("capture"):  # before the calibration images: a model that cannot be captured stops at once
            graph = capture(loaded.model, tuple(cfg["input_size"]))
        with phase("load"):
            calib = load_calibration(data, cfg, progress)
    summary = rec.summary()
    return Prepared(loaded, cfg, graph, calib, eval_set, _labels(eval_set), data.workers, device,
                    phases=summary["phases"], peak_rss_mb=summary["peak_rss_mb"])


def fp32_result(prep: Prepared, batch_size: int = 128, progress: bool = True) -> EvalResult:
    """FP32 evaluation of the original model, computed once per :class:`Prepared`."""
    if prep.fp32 is None:
        with _recorder(progress) as rec:
            with phase("eval fp32"):
                prep.fp32 = evaluate_sharded(prep.loaded.model.to(prep.device), prep.eval_set, batch_size,
                                             prep.workers, prep.device, progress=progress, desc="eval fp32")
            prep.phases["eval fp32"] = dict(rec.records["eval fp32"])
            prep.peak_rss_mb = max(prep.peak_rss_mb, rec.records["eval fp32"]["peak_rss_mb"])
    return prep.fp32


#: ``seconds_breakdown`` keys (report.json before per-phase figures) -> the phase they are
_BREAKDOWN = {"load": "load", "capture": "capture", "eval_fp32": "eval fp32", "quantize": "quantize",
              "eval_quant": "eval quantized"}


def run_config(prep: Prepared, config: QuantConfig, batch_size: int = 128, progress: bool = True,
               workspace: Workspace | None = None) -> tuple[dict[str, Any], QuantizedGraph, dict[str, Any]]:
    """Quantize the prepared graph with ``config`` and evaluate it; returns (report, qgraph, meta).

    ``workspace``: memory budget and spill folder of the calibration values (:func:`quantize_graph`'s).
    The run records its phases with its own :class:`~hybridquant.phases.Phases` (call it outside any other
    recorder: each resets the kernel's peak-memory mark); the report's ``phases`` add those of
    :func:`prepare` and the FP32 evaluation, shared by every config on ``prep``.
    """
    t0 = time.perf_counter()
    float_node_names(prep.graph, config.float_ops)  # fail on a bad pattern before any long work
    with Phases(progress=progress) as rec:
        fp32 = fp32_result(prep, batch_size, progress)
        with phase("quantize"):
            qgraph = quantize_graph(prep.graph, config, prep.calib, progress=progress, workspace=workspace)
        with phase("eval quantized"):
            quant = evaluate_sharded(qgraph.run, prep.eval_set, batch_size, prep.workers, "cpu",
                                     progress=progress, desc="eval quantized")
        with phase("layer sqnr"):
            sqnr_images = prep.calib[: config.sqnr_images]
            sqnr = layer_sqnr(qgraph, sqnr_images)  # against the transformed float graph (qgraph.reference)
            refined = layer_sqnr(qgraph, sqnr_images, reference=qgraph.graph) if qgraph.reference is not None \
                else None
        with phase("integer summary"):
            integer, size = integer_summary(qgraph)
    run = rec.summary()
    phases = {**prep.phases, **run["phases"]}  # load, capture, FP32 eval (shared by every config) first
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
        "eval_ranks": world_size(),  # processes the evaluations were split over (torchrun)
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
        "phases": phases,
        # the run's peak: loading and capture (shared) or this config's work, whichever is higher
        "peak_rss_mb": max(prep.peak_rss_mb, run["peak_rss_mb"]),
        "seconds_breakdown": {key: phases[name]["seconds"] for key, name in _BREAKDOWN.items() if name in phases},
        "environment": environment(),
    }
    if workspace is not None:
        report["workspace"] = workspace.stats()
    # one run's wall time: loading and capture (shared) plus this config's work (with the FP32 eval if it ran now)
    shared = sum(prep.phases[name]["seconds"] for name in ("load", "capture") if name in prep.phases)
    report["seconds"] = round(shared + time.perf_counter() - t0, 2)
    report["quantize_seconds"] = phases["quantize"]["seconds"]
    return report, qgraph, meta


def quantize_job(
    model: str,
    checkpoint: str | None,
    pretrained: bool,
    data: DataSpec,
    config: QuantConfig,
    device: str = "cpu",
    progress: bool = True,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
) -> tuple[dict[str, Any], QuantizedGraph, dict[str, Any]]:
    """Quantize ``model`` on ``data`` with ``config``; returns (report, qgraph, model_meta).

    ``memory_budget``: bytes of calibration values kept in memory (default
    :func:`~hybridquant.store.default_budget`); the rest spills to files under ``spill_dir`` (default: a
    temporary folder), which is removed at the end, also on error. A runtime choice: it changes speed and
    memory, never the result.
    """
    prep = prepare(model, checkpoint, pretrained, data, device, progress)
    workspace = Workspace(memory_budget, spill_dir)
    try:
        return run_config(prep, config, data.batch_size, progress, workspace)
    finally:
        workspace.close()
        if spill_dir is not None:
            with contextlib.suppress(OSError):  # made for this run; a folder holding anything else is left alone
                Path(spill_dir).rmdir()  # (under torchrun every rank tries: the last one removes it)

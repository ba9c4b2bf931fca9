"""Objective-based power-of-two exponents, chosen layer by layer.

Naive power-of-two rounding replaces a scale s by 2^round(log2 s). Here each
exponent is chosen among candidates around that value by the error it causes
where it matters — in the outputs that read the tensor:

* **weights** (per output channel): for candidate exponents k_c + d, the
  error of that channel of the layer's output against the float model's
  output. Channels are independent, so the per-channel argmin is the joint
  optimum over the layer. An empirical bias correction then removes the mean
  output error per channel (it stays an int32 bias, still multiplier-free).
* **float scales** (``float_scales``): the same objective over a superset of the power-of-two
  candidates (:data:`FLOAT_ACT_STEPS`, :data:`FLOAT_WEIGHT_STEPS`), so float scales can only do
  better than powers of two, choice by choice.
* **activations** (per tensor): for candidate exponents k + d, the summed
  relative error of every consumer's output (a conv, a matmul, a softmax, a
  LayerNorm, ...) against the float model. A LayerNorm input with per-channel
  factors (``ptf``) moves all its channels' exponents together. With
  ``zero_point_search`` an asymmetric grid also tries lower zero points (giving up part of the
  negative side, which a SiLU after it flattens, for range on the positive
  side). A lookup table's input named in ``lut_grids`` skips the search: it
  gets a threshold grid (:mod:`.lut_grid`) from its table's output grid.

The graph is walked in topological order on calibration images with the
*quantized* values flowing forward, so every choice sees the error of the
choices before it (sequential calibration), while targets stay the float
model's values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...graph import ops as graph_ops
from ...graph.ir import Node
from ...graph.quantized import QuantizedGraph
from ...primitives import exp2_int, pot_exponent, pot_scale, two_term_round
from ...qparams import QParams, with_scale
from .lut_grid import lut_input_grid
from .weight_rounding import gptq

ACT_DELTAS = (-2, -1, 0, 1)
WEIGHT_DELTAS = (-1, 0, 1)
#: float scales (``scales='float'``): after the power-of-two candidates, the best one times 2^(j/4) — a
#: superset of the power-of-two search, so a float-scale model's every choice is at least as good
FLOAT_ACT_STEPS = (-3, -2, -1, 1, 2, 3)
#: float weight scales: the power-of-two candidates, and the per-channel min-max scale clipped by 2^(-j/8)
FLOAT_WEIGHT_STEPS = (-4, -3, -2, -1, 0)
#: fractions of an asymmetric grid's zero point the activation search may remove
ZERO_POINT_MOVES = (0.125, 0.25, 0.5, 0.75)
TWO_TERM_DELTAS = (-2, -1, 0, 1, 2)
#: calibration images of the sequential search; fewer over-fit the bias correction and GPTQ of small
#: layers (the classifier sees one row per image): 256 instead of 64 gave +0.7 dB logit SQNR on the
#: bundled model at W8A8-PoT, 512 nothing more
SEARCH_IMAGES = 256


def _channel_axis(node: Node) -> int:
    return 1 if node.op == "conv2d" else -1


def _per_channel_sq_err(out: torch.Tensor, ref: torch.Tensor, axis: int) -> torch.Tensor:
    return (out - ref).pow(2).transpose(0, axis).flatten(1).sum(1)


def _exponent(qp: QParams) -> torch.Tensor:
    return pot_exponent(qp.scale, "round")


class _Walker:
    """Runs the quantized graph node by node on a fixed batch, keeping values."""

    def __init__(self, qgraph: QuantizedGraph, x: torch.Tensor):
        self.qg = qgraph
        self.graph = qgraph.graph
        self.ref = self.graph.run(x, keep=True)
        self.x = x
        self.q: dict[str, torch.Tensor] = {}
        self.raw: dict[str, torch.Tensor] = {}

    def inputs_of(self, node: Node) -> list[torch.Tensor]:
        if node.attrs.get("raw_input"):
            return [self.raw[node.inputs[0]]]
        return [self.q[i] if i in self.q else self.ref[i] for i in node.inputs]

    def run_with_weight(self, node: Node, inputs: list[torch.Tensor], wq: QParams | None) -> torch.Tensor:
        if wq is None:
            return graph_ops.run_op(node, inputs)
        params = dict(node.params)
        params["weight"] = wq.fake(node.params["weight"].flatten(1)).reshape(node.params["weight"].shape)
        probe = Node(node.name, node.op, node.inputs, node.attrs, params)
        return graph_ops.run_op(probe, inputs)

    def consumer_error(self, name: str, value: torch.Tensor) -> float:
        """Summed relative error of the consumers' outputs when ``name`` carries ``value``."""
        total, used = 0.0, 0
        for chain, user, idx in self.graph.value_users(name):
            if user.attrs.get("raw_input"):
                continue  # reads the value before this quantizer
            if user.op == "output":
                ref = self.ref[name]
                total += float((value - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
                used += 1
                continue
            t = value
            for layout in chain:
                t = graph_ops.run_op(layout, [t])
            ins = self.inputs_of(user)
            ins[idx] = t
            for j, inp in enumerate(user.inputs):  # both operands may come from `name` (x @ x)
                if j != idx and inp == user.inputs[idx]:
                    ins[j] = t
            out = self.run_with_weight(user, ins, self.qg.weight.get(user.name))
            ref = self.ref[user.name]
            total += float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
            used += 1
        if used == 0:
            ref = self.ref[name]
            total = float((value - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
        return total


@torch.no_grad()
def sequential_refine(
    qgraph: QuantizedGraph,
    calib: list[torch.Tensor],
    search_weights: bool = True,
    search_acts: bool = True,
    bias_correction: bool = True,
    weight_rounding: bool = False,
    input_compensation: bool = False,
    two_term_weights: bool = False,
    max_images: int = SEARCH_IMAGES,
    rounding_targets: dict[str, torch.Tensor] | None = None,
    zero_point_search: bool = False,
    lut_grids: dict[str, str] | None = None,
    float_scales: bool = False,
) -> dict[str, Any]:
    """Choose exponents (and correct biases) node by node; edits ``qgraph`` in place.

    ``weight_rounding`` runs GPTQ on each weight on its chosen grid; with ``input_compensation`` its target
    is the float model's output from the float input, so it also absorbs the upstream error
    (:mod:`.weight_rounding`); ``rounding_targets``, when given, receives the float values GPTQ rounded.
    ``lut_grids`` maps lookup-table inputs to the node whose quantizer completes their table (the table,
    or the per-channel shift that reads it); each gets a threshold grid (:mod:`.lut_grid`) once that
    quantizer is chosen, and until then the table reads it exactly. ``float_scales`` searches float
    scales around the power-of-two candidates (the qparams start as float min-max scales)."""
    x = torch.cat(calib)[:max_images]
    walker = _Walker(qgraph, x)
    graph = qgraph.graph
    raw_needed = {n.inputs[0] for n in graph if n.attrs.get("raw_input")}
    lut_grids = lut_grids or {}
    completes = {out: src for src, out in lut_grids.items()}  # read exactly until their table's grid is chosen
    changed_w = changed_a = changed_zp = rounded_layers = 0
    for node in graph:
        if node.op == "output":
            continue
        if node.op == "input":
            raw = x
        else:
            ins = walker.inputs_of(node)
            wq = qgraph.weight.get(node.name)
            if wq is not None and (search_weights or bias_correction):
                wq, n_changed = _choose_weight(walker, node, ins, wq, search_weights, two_term_weights, float_scales)
                qgraph.weight[node.name] = wq
                changed_w += n_changed
                x_float = walker.ref[node.inputs[0]] if input_compensation else None
                if weight_rounding and (rounded := gptq(node, ins[0], wq, x_float)) is not None:
                    node.params["weight"] = rounded.weight  # RTN of these values gives GPTQ's codes
                    if rounding_targets is not None:
                        rounding_targets[node.name] = rounded.target
                    rounded_layers += 1
                if bias_correction:
                    out = walker.run_with_weight(node, ins, wq)
                    axis = _channel_axis(node)
                    err = (walker.ref[node.name] - out).transpose(0, axis).flatten(1).mean(1)
                    node.params["bias"] = node.params.get("bias", torch.zeros_like(err)) + err
            raw = walker.run_with_weight(node, ins, qgraph.weight.get(node.name))
        if node.name in raw_needed:
            walker.raw[node.name] = raw
        qp = qgraph.act.get(node.name)
        if node.name in lut_grids:
            walker.q[node.name] = raw
            continue
        if qp is not None and qp.kind == "uniform" and search_acts:
            best, move = _choose_act(walker, node.name, raw, qp, zero_point_search, float_scales)
            changed_a += int(not torch.equal(best.scale, qp.scale))
            changed_zp += int(move != 0)
            qgraph.act[node.name] = qp = best
        if node.name in completes:
            raw = _grid_lut_input(walker, completes[node.name], node, qp, raw_needed)
        walker.q[node.name] = qp.fake(raw) if qp is not None else raw
    qgraph.rebuild()
    return {"weight_channels_moved": changed_w, "act_exponents_moved": changed_a, "act_zero_points_lowered": changed_zp,
            "lut_threshold_grids": len(lut_grids), "gptq_layers": rounded_layers, "images": int(x.shape[0])}


def _grid_lut_input(walker: _Walker, src: str, node: Node, qp: QParams, raw_needed: set[str]) -> torch.Tensor:
    """Give the lookup-table input ``src`` its threshold grid for the output grid ``qp`` of ``node`` (the
    table, or the per-channel shift reading it); the walker's values move onto the grid. Returns ``node``'s
    new value before its quantizer."""
    graph = walker.graph
    table = graph.users(src)[0]
    factor = 1.0 / node.params["inv_alpha"] if node.op == "scale_channels" else None
    grid = lut_input_grid(lambda t: graph_ops.run_op(table, [t]), qp, walker.q[src], walker.qg.act[src].bits,
                          factor, node.attrs.get("dim"))
    walker.qg.act[src] = grid
    walker.q[src] = grid.fake(walker.q[src])
    value = graph_ops.run_op(table, [walker.q[src]])
    if table.name in raw_needed:
        walker.raw[table.name] = value
    if table is node:
        return value
    walker.q[table.name] = value  # a table without a quantizer of its own, read only by ``node``
    return graph_ops.run_op(node, [value])


def _weight_candidates(wq: QParams, two_term: bool, float_scales: bool = False) -> list[torch.Tensor]:
    if two_term:  # a finer multiplicative grid, each point rounded to 2^a ± 2^b
        return [two_term_round(wq.scale.double() * 2.0 ** (d / 4)) for d in TWO_TERM_DELTAS]
    k0 = _exponent(wq)
    cands = [exp2_int(k0 + d).float() for d in WEIGHT_DELTAS]
    if float_scales:
        cands += [wq.scale * 2.0 ** (j / 8) for j in FLOAT_WEIGHT_STEPS]
    return cands


def _choose_weight(walker: _Walker, node: Node, ins: list[torch.Tensor], wq: QParams, search: bool,
                   two_term: bool = False, float_scales: bool = False):
    if not search:
        return wq, 0
    axis = _channel_axis(node)
    ref = walker.ref[node.name]
    best_err, best_scale = None, wq.scale.clone()
    for scale in _weight_candidates(wq, two_term, float_scales):  # includes the naive choice
        cand = with_scale(wq, scale)
        err = _per_channel_sq_err(walker.run_with_weight(node, ins, cand), ref, axis)
        if best_err is None:
            best_err, best_scale = err, cand.scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, cand.scale, best_scale)
    return with_scale(wq, best_scale), int((best_scale != wq.scale).sum())


def _choose_act(walker: _Walker, name: str, raw: torch.Tensor, qp: QParams,
                zero_point_search: bool = False, float_scales: bool = False) -> tuple[QParams, int]:
    """The exponent (for per-channel PTF scales: all channels' exponents together) with the least consumer
    error, and how many codes its zero point was lowered below the min-max one (0 without ``zero_point_search``).
    With ``float_scales`` the best power-of-two scale is then refined by the factors 2^(j/4), and the float
    min-max scale ``qp`` itself is a candidate too."""
    lo = torch.tensor(-float(qp.zero_point) * float(qp.scale.max()))  # a shared zero point: the widest channel's
    start = with_scale(qp, pot_scale(qp.scale, "round").float().reshape(qp.scale.shape), lo=lo) if float_scales else qp
    best, best_err, best_move = qp, None, 0

    def consider(scale: torch.Tensor) -> None:
        nonlocal best, best_err, best_move
        base = with_scale(qp, scale, lo=lo)
        for move in zero_point_moves(base) if zero_point_search else [0]:
            cand = dataclasses.replace(base, zero_point=base.zero_point - move)
            err = walker.consumer_error(name, cand.fake(raw))
            if best_err is None or err < best_err:
                best, best_err, best_move = cand, err, move

    for d in ACT_DELTAS:
        consider(start.scale * 2.0**d)
    if float_scales:
        pot_best = best.scale
        for j in FLOAT_ACT_STEPS:
            consider(pot_best * 2.0 ** (j / 4))
        consider(qp.scale)
    return best, best_move


def zero_point_moves(qp: QParams) -> list[int]:
    """How far below its min-max value to try an asymmetric grid's zero point: 0 and the fractions
    :data:`ZERO_POINT_MOVES` of it (rounded down); ``[0]`` for a grid without a zero point."""
    if qp.qmin != 0 or not bool((qp.zero_point != 0).any()):
        return [0]
    z = int(qp.zero_point.min())
    return [0] + sorted({int(f * z) for f in ZERO_POINT_MOVES} - {0})

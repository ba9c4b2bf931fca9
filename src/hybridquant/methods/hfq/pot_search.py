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
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from ... import heap
from ...graph.ir import Node
from ...graph.quantized import QuantizedGraph
from ...graph.stream import FloatStream, split_images
from ...ops import run_float
from ...phases import progress_enabled
from ...primitives import exp2_int, pot_exponent, pot_scale, two_term_round
from ...qparams import QParams, with_scale
from ...store import Lazy, Stored, Workspace
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


def _per_channel_sq_err(out: torch.Tensor, ref: torch.Tensor, axis: int) -> torch.Tensor:
    return (out - ref).pow(2).transpose(0, axis).flatten(1).sum(1)


def _exponent(qp: QParams) -> torch.Tensor:
    return pot_exponent(qp.scale, "round")


class _Walker:
    """The quantized graph walked node by node on the search images, chunk by chunk.

    ``q[name]``: the value as its readers see it (after its quantizer), ``raw[name]``: before it (kept for
    ``raw_input`` readers); the float model's values (the targets) come from a :class:`FloatStream` over a
    copy of the graph taken at the start, so the walk's edits (biases, GPTQ weights) never reach them.
    A value is freed once its node and every reader of it are done (:meth:`done`): memory holds the values
    that are live at one point of the graph, and the workspace spills those past its budget."""

    def __init__(self, qgraph: QuantizedGraph, x: torch.Tensor | list[torch.Tensor],
                 workspace: Workspace | None = None, limit: int | None = None):
        self.qg = qgraph
        self.graph = qgraph.graph
        self.ws = workspace if workspace is not None else Workspace()
        self.chunks = split_images(self.graph, x, self.ws, limit=limit)
        self.images = [c.shape[0] for c in self.chunks]
        self.stream = FloatStream(self.graph.clone(), self.chunks, self.ws)
        self.index = {n.name: i for i, n in enumerate(self.graph)}
        self.q: dict[str, Stored] = {}
        self.raw: dict[str, Stored] = {}
        self._done: set[str] = set()
        #: values kept until another node is walked (a lookup-table input until its table's grid is chosen)
        self.hold_until: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.chunks)

    def ref(self, name: str) -> Stored:
        """The float model's value of ``name`` on the search images."""
        return self.stream.value(name)

    def compute(self, fn) -> Stored:
        """``fn(b)`` for every chunk ``b``, stored."""
        out = Stored(self.ws)
        for b, n in enumerate(self.images):
            out.append(fn(b), n)
        return out

    def inputs_of(self, node: Node, b: int) -> list[torch.Tensor]:
        """``node``'s inputs on chunk ``b``, as it reads them in the quantized graph."""
        if node.attrs.get("raw_input"):
            return [self.raw[node.inputs[0]].chunk(b)]
        return [self.q[i].chunk(b) if i in self.q else self.ref(i).chunk(b) for i in node.inputs]

    def run_with_weight(self, node: Node, inputs: list[torch.Tensor], wq: QParams | None) -> torch.Tensor:
        if wq is None:
            return run_float(node, inputs)
        params = dict(node.params)
        params["weight"] = wq.fake(node.params["weight"].flatten(1)).reshape(node.params["weight"].shape)
        return run_float(node, inputs, params)

    def consumer_errors(self, name: str, raw: Stored, values: list[Callable[[torch.Tensor], torch.Tensor]]
                        ) -> list[float]:
        """For each candidate ``values[c]`` (a function of a chunk of ``raw``: the value ``name`` would
        carry), the summed relative error of the consumers' outputs. Numerators and denominators are summed
        over the chunks before dividing, so the result is the error over all search images."""
        users = [(chain, user, idx) for chain, user, idx in self.graph.value_users(name)
                 if not user.attrs.get("raw_input")]  # those read the value before this quantizer
        targets = [name if user.opdef.role == "sink" else user.name for _, user, _ in users] or [name]
        num = [[torch.zeros(()) for _ in targets] for _ in values]
        den = [torch.zeros(()) for _ in targets]
        for b in range(len(self)):
            raw_b = raw.chunk(b)
            for u, target in enumerate(targets):
                ref = self.ref(target).chunk(b)
                den[u] = den[u] + ref.pow(2).sum()
                if not users or users[u][1].opdef.role == "sink":
                    for c, fn in enumerate(values):
                        num[c][u] = num[c][u] + (fn(raw_b) - ref).pow(2).sum()
                    continue
                chain, user, idx = users[u]
                base = self.inputs_of(user, b)
                for c, fn in enumerate(values):
                    t = fn(raw_b)
                    for layout in chain:
                        t = run_float(layout, [t])
                    ins = list(base)
                    ins[idx] = t
                    for j, inp in enumerate(user.inputs):  # both operands may come from `name` (x @ x)
                        if j != idx and inp == user.inputs[idx]:
                            ins[j] = t
                    out = self.run_with_weight(user, ins, self.qg.weight.get(user.name))
                    num[c][u] = num[c][u] + (out - ref).pow(2).sum()
        return [sum(float(n / d.clamp_min(1e-30)) for n, d in zip(row, den, strict=True)) for row in num]

    def consumer_error(self, name: str, value: Stored) -> float:
        """Summed relative error of the consumers' outputs when ``name`` carries ``value``."""
        return self.consumer_errors(name, value, [lambda v: v])[0]

    def replace(self, name: str, value: Stored) -> None:
        """``name`` now carries ``value`` (before and after its quantizer: a lookup table's input moved onto
        its grid); the old values are freed."""
        self._free(name, release_ref=False)
        self.q[name] = self.raw[name] = value

    def done(self, node: Node) -> None:
        """``node`` is walked: free the values no later node reads."""
        self._done.add(node.name)
        held = [src for src, until in self.hold_until.items() if until == node.name]
        freed = [name for name in [node.name, *node.inputs, *held]
                 if name in self._done and self.hold_until.get(name, name) in self._done
                 and all(u.name in self._done for u in self.graph.users(name) if u.opdef.role != "sink")]
        for name in freed:
            self._free(name)
        if freed:
            heap.release()

    def _free(self, name: str, release_ref: bool = True) -> None:
        q, raw = self.q.pop(name, None), self.raw.pop(name, None)
        if q is not None and q is not raw:
            q.free()
        if raw is not None:
            raw.free()
        if release_ref:
            self.stream.release(name)

    def close(self) -> None:
        for name in list(self.q) + list(self.raw):
            if name in self.q or name in self.raw:
                self._free(name)
        self.stream.close()


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
    workspace: Workspace | None = None,
) -> dict[str, Any]:
    """Choose exponents (and correct biases) node by node; edits ``qgraph`` in place.

    ``weight_rounding`` runs GPTQ on each weight on its chosen grid; with ``input_compensation`` its target
    is the float model's output from the float input, so it also absorbs the upstream error
    (:mod:`.weight_rounding`); ``rounding_targets``, when given, receives the float values GPTQ rounded.
    ``lut_grids`` maps lookup-table inputs to the node whose quantizer completes their table (the table,
    or the per-channel shift that reads it); each gets a threshold grid (:mod:`.lut_grid`) once that
    quantizer is chosen, and until then the table reads it exactly. ``float_scales`` searches float
    scales around the power-of-two candidates (the qparams start as float min-max scales). Values are
    kept chunk by chunk in ``workspace`` (a default one when None)."""
    walker = _Walker(qgraph, calib, workspace, limit=max_images)
    graph = qgraph.graph
    raw_needed = {n.inputs[0] for n in graph if n.attrs.get("raw_input")}
    lut_grids = lut_grids or {}
    completes = {out: src for src, out in lut_grids.items()}  # read exactly until their table's grid is chosen
    walker.hold_until.update(lut_grids)
    changed_w = changed_a = changed_zp = rounded_layers = 0
    nodes = [n for n in graph if n.opdef.role != "sink"]
    try:
        for node in tqdm(nodes, desc="exponent search", disable=not progress_enabled(), leave=False):
            if node.opdef.role == "source":
                raw = Stored.of(walker.ws, walker.chunks)
            else:
                wq = qgraph.weight.get(node.name)
                if wq is not None and (search_weights or bias_correction):
                    wq, n_changed = _choose_weight(walker, node, wq, search_weights, two_term_weights, float_scales)
                    qgraph.weight[node.name] = wq
                    changed_w += n_changed
                    if weight_rounding:
                        # chunk by chunk, never all at once: GPTQ sums its Hessian over the chunks
                        xs = Lazy(len(walker), lambda b, node=node: walker.inputs_of(node, b)[0])
                        x_float = Lazy(len(walker), walker.ref(node.inputs[0]).chunk) if input_compensation \
                            else None
                        if (rounded := gptq(node, xs, wq, x_float)) is not None:
                            node.params["weight"] = rounded.weight  # RTN of these values gives GPTQ's codes
                            if rounding_targets is not None:
                                rounding_targets[node.name] = rounded.target
                            rounded_layers += 1
                        del xs, x_float
                    if bias_correction:
                        _correct_bias(walker, node, wq)
                raw = walker.compute(lambda b, node=node: walker.run_with_weight(
                    node, walker.inputs_of(node, b), qgraph.weight.get(node.name)))
            walker.raw[node.name] = raw
            qp = qgraph.act.get(node.name)
            if node.name in lut_grids:
                walker.q[node.name] = raw
            else:
                if qp is not None and qp.grid == "uniform" and search_acts:
                    best, move = _choose_act(walker, node.name, raw, qp, zero_point_search, float_scales)
                    changed_a += int(not torch.equal(best.scale, qp.scale))
                    changed_zp += int(move != 0)
                    qgraph.act[node.name] = qp = best
                if node.name in completes:
                    raw = _grid_lut_input(walker, completes[node.name], node, qp)
                    walker.raw.pop(node.name).free()
                    walker.raw[node.name] = raw
                walker.q[node.name] = walker.compute(lambda b, qp=qp, raw=raw: qp.fake(raw.chunk(b))) \
                    if qp is not None else raw
            if node.name not in raw_needed and walker.raw[node.name] is not walker.q[node.name]:
                walker.raw.pop(node.name).free()  # nobody reads it before its quantizer
            walker.done(node)
    finally:
        walker.close()
    qgraph.rebuild()
    return {"weight_channels_moved": changed_w, "act_exponents_moved": changed_a, "act_zero_points_lowered": changed_zp,
            "lut_threshold_grids": len(lut_grids), "gptq_layers": rounded_layers, "images": sum(walker.images)}


def _correct_bias(walker: _Walker, node: Node, wq: QParams) -> None:
    """Add the mean output error per channel (float model minus quantized layer) to the bias."""
    axis = node.opdef.channel_axis
    total, count = None, 0
    for b in range(len(walker)):
        out = walker.run_with_weight(node, walker.inputs_of(node, b), wq)
        diff = (walker.ref(node.name).chunk(b) - out).transpose(0, axis).flatten(1)
        total = diff.sum(1) if total is None else total + diff.sum(1)
        count += diff.shape[1]
    assert total is not None
    err = total / count
    node.params["bias"] = node.params.get("bias", torch.zeros_like(err)) + err


def _grid_lut_input(walker: _Walker, src: str, node: Node, qp: QParams) -> Stored:
    """Give the lookup-table input ``src`` its threshold grid for the output grid ``qp`` of ``node`` (the
    table, or the per-channel shift reading it); the walker's values move onto the grid. Returns ``node``'s
    new value before its quantizer."""
    graph = walker.graph
    table = graph.users(src)[0]
    scale = node.opdef.channel_scale
    factor = 1.0 / scale(node) if scale is not None else None
    exact = walker.q[src]
    grid = lut_input_grid(lambda t: run_float(table, [t]), qp, list(exact), walker.qg.act[src].bits,
                          factor, node.attrs.get("dim"))
    walker.qg.act[src] = grid
    walker.replace(src, walker.compute(lambda b: grid.fake(exact.chunk(b))))
    gridded = walker.q[src]
    value = walker.compute(lambda b: run_float(table, [gridded.chunk(b)]))
    if table is node:
        return value
    walker.replace(table.name, value)  # a table without a quantizer of its own, read only by ``node``
    return walker.compute(lambda b: run_float(node, [value.chunk(b)]))


def _weight_candidates(wq: QParams, two_term: bool, float_scales: bool = False) -> list[torch.Tensor]:
    if two_term:  # a finer multiplicative grid, each point rounded to 2^a ± 2^b
        return [two_term_round(wq.scale.double() * 2.0 ** (d / 4)) for d in TWO_TERM_DELTAS]
    k0 = _exponent(wq)
    cands = [exp2_int(k0 + d).float() for d in WEIGHT_DELTAS]
    if float_scales:
        cands += [wq.scale * 2.0 ** (j / 8) for j in FLOAT_WEIGHT_STEPS]
    return cands


def _choose_weight(walker: _Walker, node: Node, wq: QParams, search: bool,
                   two_term: bool = False, float_scales: bool = False):
    if not search:
        return wq, 0
    axis = node.opdef.channel_axis
    cands = [with_scale(wq, scale) for scale in _weight_candidates(wq, two_term, float_scales)]  # naive first
    errs: list[torch.Tensor | None] = [None] * len(cands)
    for b in range(len(walker)):
        ins, ref = walker.inputs_of(node, b), walker.ref(node.name).chunk(b)
        for c, cand in enumerate(cands):
            e = _per_channel_sq_err(walker.run_with_weight(node, ins, cand), ref, axis)
            errs[c] = e if errs[c] is None else errs[c] + e
    best_err, best_scale = errs[0], cands[0].scale
    for cand, err in zip(cands[1:], errs[1:], strict=True):
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand.scale, best_scale)
    return with_scale(wq, best_scale), int((best_scale != wq.scale).sum())


def _choose_act(walker: _Walker, name: str, raw: Stored, qp: QParams,
                zero_point_search: bool = False, float_scales: bool = False) -> tuple[QParams, int]:
    """The exponent (for per-channel PTF scales: all channels' exponents together) with the least consumer
    error, and how many codes its zero point was lowered below the min-max one (0 without ``zero_point_search``).
    With ``float_scales`` the best power-of-two scale is then refined by the factors 2^(j/4), and the float
    min-max scale ``qp`` itself is a candidate too. Candidates are compared in order, the first of equal
    errors kept."""
    lo = torch.tensor(-float(qp.zero_point) * float(qp.scale.max()))  # a shared zero point: the widest channel's
    start = with_scale(qp, pot_scale(qp.scale, "round").float().reshape(qp.scale.shape), lo=lo) if float_scales else qp
    best, best_err, best_move = qp, None, 0

    def consider(scales: list[torch.Tensor]) -> None:
        nonlocal best, best_err, best_move
        cands = []
        for scale in scales:
            base = with_scale(qp, scale, lo=lo)
            for move in zero_point_moves(base) if zero_point_search else [0]:
                cands.append((dataclasses.replace(base, zero_point=base.zero_point - move), move))
        errs = walker.consumer_errors(name, raw, [cand.fake for cand, _ in cands])
        for (cand, move), err in zip(cands, errs, strict=True):
            if best_err is None or err < best_err:
                best, best_err, best_move = cand, err, move

    consider([start.scale * 2.0**d for d in ACT_DELTAS])
    if float_scales:
        pot_best = best.scale
        consider([pot_best * 2.0 ** (j / 4) for j in FLOAT_ACT_STEPS] + [qp.scale])
    return best, best_move


def zero_point_moves(qp: QParams) -> list[int]:
    """How far below its min-max value to try an asymmetric grid's zero point: 0 and the fractions
    :data:`ZERO_POINT_MOVES` of it (rounded down); ``[0]`` for a grid without a zero point."""
    if qp.qmin != 0 or not bool((qp.zero_point != 0).any()):
        return [0]
    z = int(qp.zero_point.min())
    return [0] + sorted({int(f * z) for f in ZERO_POINT_MOVES} - {0})

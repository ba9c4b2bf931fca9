"""``lower(qgraph) -> Program``: a quantized graph as an integer program, without running an image.

A generic walker: each node's op module (:mod:`hybridquant.ops`) records the
op's integer form — its program kind, constants and the scale of its
accumulator — and this walker adds the requantization stage from that
accumulator to the node's output quantizer. Every multiplier must be a power
of two (or 2^a ± 2^b with ``--shift-terms 2``); it becomes shifts. Values are
followed symbolically (scale, zero point, channel axis) and shapes come from
:meth:`~hybridquant.graph.ir.Graph.shapes` (meta tensors). A multiplier that
is not a power of two is refused with a clear error unless
``allow_float_multipliers=True``, which records it as a float (``mode
'float'``: not multiplier-free; for comparison only, never exported).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import HybridQuantError
from ..graph.ir import Node
from ..graph.quantized import QuantizedGraph
from ..ops import op_def
from ..ops.values import Value, json_attr, np_int, np_small
from ..primitives import arith
from ..qparams import QParams
from .program import Program, ProgramOp


def requant_arrays(name: str, s_in: torch.Tensor, qp: QParams, terms: int,
                   allow_float: bool) -> tuple[str, dict[str, np.ndarray]]:
    """``(mode, arrays)`` of the requantization from accumulator scale ``s_in`` to ``qp``: multiplier
    M = s_in / s_out as one shift (``shift``), two (``two_term``) or onto a threshold grid (``threshold``);
    a float multiplier (``float``) only where allowed."""
    m = (s_in.double() / qp.scale.double()).flatten()
    arrays = {"requant.zero_point": np_small(qp.zero_point), "requant.qmin": np_small(qp.qmin),
              "requant.qmax": np_small(qp.qmax)}
    try:
        params = [arith.multiplier_to_shifts(float(v), terms) for v in m]
    except ValueError as exc:
        if not allow_float or qp.grid == "threshold":  # a threshold grid has no float form here
            raise HybridQuantError(
                f"requantization multiplier of node {name} is not a power of two "
                f"(e.g. {float(m[0]):.6g}); quantize with --scales pot or allow float multipliers"
            ) from exc
        return "float", {**arrays, "requant.multiplier": m.numpy().copy()}
    a, b, sign, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*params, strict=True))
    if a.numel() == 1:
        a, b, sign, n = a[0], b[0], sign[0], n[0]
    if bool((sign == 0).all()) and qp.grid != "threshold":
        return "shift", {**arrays, "requant.shift": np_small(n - a)}
    arrays.update({"requant.a": np_small(a), "requant.b": np_small(b), "requant.sign": np_small(sign),
                   "requant.n": np_small(n)})
    if qp.grid == "threshold":
        return "threshold", {**arrays, "requant.thresholds": np_int(qp.thresholds)}
    return "two_term", arrays


def lower(qgraph: QuantizedGraph, allow_float_multipliers: bool = False) -> Program:
    """The integer program of ``qgraph``; HybridQuantError where it cannot be lowered (float nodes,
    quantizers without an integer kernel, float multipliers unless allowed)."""
    return _Lowering(qgraph, allow_float_multipliers).run()


class _Lowering:
    """The lowering's state, which each op's ``lower`` (:mod:`hybridquant.ops`) reads and extends: the
    quantized graph, every node's shape, and what is known of each value (codes: ``vals``; accumulators a
    per-channel shift reads: ``wide``; non-linearities read only through per-channel tables: ``deferred``)."""

    def __init__(self, qgraph: QuantizedGraph, allow_float: bool):
        self.qg, self.graph, self.allow_float = qgraph, qgraph.graph, allow_float
        if qgraph.float_nodes:
            raise HybridQuantError(f"cannot lower: nodes left in float ({', '.join(qgraph.float_nodes[:3])} ...)")
        for node in self.graph:
            qp = qgraph.act.get(node.name)
            if op_def(node.op).lower is None:
                raise HybridQuantError(f"cannot lower {node.name}: integer {node.op} is not implemented")
            if qp is not None and qp.grid == "threshold":
                if not all(op_def(u.op).elementwise for u in self.graph.users(node.name)):
                    raise HybridQuantError(f"cannot lower {node.name}: a threshold grid may feed lookup tables only")
            elif qp is not None and qp.grid != "uniform":
                raise HybridQuantError(f"cannot lower {node.name}: {qp.grid} quantizers have no integer kernel yet")
        self.raw_readers = {n.inputs[0] for n in self.graph if n.attrs.get("raw_input")}
        self.shapes = self.graph.shapes()
        self.vals: dict[str, Value] = {}
        self.wide: dict[str, Value] = {}
        self.deferred: dict[str, Node] = {}

    def run(self) -> Program:
        ops = []
        for index, node in enumerate(self.graph):
            op = ProgramOp(index, node.name, node.op, node.op, [], out_shape=None)
            acc = op_def(node.op).lower(self, node, op)
            if acc is not None:  # the accumulator has the node's shape, requantized or not
                op.out_shape = self.shapes[node.name]
            if acc is not None and node.name in self.raw_readers:
                self.wide[node.name] = acc
            qp = self.qg.act.get(node.name)
            if acc is not None and qp is not None:
                self._requant(node, op, acc, qp)
            ops.append(op)
        read_wide = {op.inputs[0] for op in ops if op.attrs.get("reads") == "accumulator"}
        for op in ops:
            if op.name in read_wide:
                op.attrs["keep_accumulator"] = True
        return Program(ops, [int(d) for d in self.graph.meta["input_size"]], self.qg.config.to_dict())

    @staticmethod
    def value(qp: QParams) -> Value:
        """The codes of a value quantized with ``qp``."""
        return Value(qp.scale, qp.zero_point)

    @staticmethod
    def fill(op: ProgramOp, kind: str, inputs: list[str], attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Record into ``op`` its program kind, the values it reads, attributes (made JSON-able) and arrays."""
        op.kind, op.inputs = kind, list(inputs)
        op.attrs.update(json_attr(attrs))
        op.arrays.update(arrays)

    def _requant(self, node: Node, op: ProgramOp, acc: Value, qp: QParams) -> None:
        terms = self.qg.config.shift_terms if node.name in self.qg.weight else 1
        mode, arrays = requant_arrays(node.name, acc.scale, qp, terms, self.allow_float)
        ndim = len(self.shapes[node.name])
        per_channel = (acc.scale.double() / qp.scale.double()).numel() > 1
        # a per-channel parameter without an axis broadcasts along the last dim (as torch does)
        axis = ((acc.axis if acc.axis is not None else ndim - 1) % ndim) if per_channel else None
        self.fill(op, op.kind, op.inputs, {"requant": {"mode": mode, "axis": axis}}, arrays)
        self.vals[node.name] = self.value(qp)

"""The integer program: a quantized graph run on integers only.

:class:`IntegerModel` lowers a :class:`~hybridquant.graph.quantized.QuantizedGraph`
once (checking that every requantization multiplier is a power of two — or
2^a ± 2^b with ``--shift-terms 2`` — and precomputing shifts, lookup tables
and LayerNorm constants) and then runs it on int64 code tensors:

* conv / linear / matmul: integer products summed exactly (computed through
  float64, exact below 2^53), plus the int32 bias at s_in·s_w;
* requantization: arithmetic right shift with round-half-up, then saturation
  (:func:`~hybridquant.integer.arith.requantize`);
* residual adds and concats: operands aligned to the finest scale by left
  shifts, summed, requantized;
* SiLU / GELU / sigmoid / ReLU / hardswish: lookup tables indexed by the code;
* softmax and LayerNorm: the integer kernels of :mod:`.arith`;
* outlier-scaling shifts (``scale_channels``): a per-channel requantization
  of the producer's wide accumulator (or a per-channel lookup table after a
  non-linearity).

A multiplier that is not a power of two is refused with a clear error unless
``allow_float_multipliers=True``, which rounds ``acc·M`` in float64 instead
(not multiplier-free; for comparison only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..graph import ops as graph_ops
from ..graph.ir import ELEMENTWISE_OPS, LAYOUT_OPS, Node
from ..graph.quantized import QuantizedGraph
from ..primitives import quantize
from ..qparams import QParams
from . import arith, nonlinear

_FN = {
    "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu, "hardswish": F.hardswish,
    "gelu": F.gelu,
}


@dataclass
class IntValue:
    """Integer codes ``q`` with float ``scale`` (0-d or per channel along ``axis``) and zero point."""

    q: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor
    axis: int | None = None

    def centred(self) -> torch.Tensor:
        return self.q - _bc(self.zp, self.q, self.axis)


def _bc(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if t.dim() == 0 or axis is None:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


class Requant:
    """acc at scale ``s_in`` -> codes at ``qp``: multiplier M = s_in / s_out, as shifts."""

    def __init__(self, name: str, s_in: torch.Tensor, qp: QParams, terms: int, allow_float: bool):
        m = (s_in.double() / qp.scale.double()).flatten()
        self.qp = qp
        self.params: list[tuple[int, int, int, int]] | None = []
        self.m = m
        try:
            self.params = [arith.multiplier_to_shifts(float(v), terms) for v in m]
        except ValueError as exc:
            if not allow_float:
                raise HybridQuantError(
                    f"requantization multiplier of node {name} is not a power of two "
                    f"(e.g. {float(m[0]):.6g}); quantize with --scales pot or allow float multipliers"
                ) from exc
            self.params = None

    def __call__(self, acc: torch.Tensor, axis: int | None) -> torch.Tensor:
        qp = self.qp
        zp = qp.zero_point.to(torch.int64)
        if self.params is None:  # float fallback (explicitly allowed)
            m = _bc(self.m, acc, axis if self.m.numel() > 1 else None)
            return torch.clamp(torch.floor(acc.double() * m + 0.5).to(torch.int64) + zp, qp.qmin, qp.qmax)
        a, b, sign, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*self.params, strict=True))
        ax = axis if a.numel() > 1 else None
        if a.numel() == 1:
            a, b, sign, n = a[0], b[0], sign[0], n[0]
        if bool((sign == 0).all()):
            return arith.requantize(acc, n - a, zp, qp.qmin, qp.qmax, axis=ax)
        return arith.requantize_two_term(acc, a, b, sign, n, zp, qp.qmin, qp.qmax, axis=ax)


def _exact_int(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).to(torch.int64)


class IntegerModel:
    """A lowered quantized graph that runs on integers; see the module docstring."""

    def __init__(self, qgraph: QuantizedGraph, allow_float_multipliers: bool = False):
        self.qg = qgraph
        self.graph = qgraph.graph
        self.allow_float = allow_float_multipliers
        self.terms = qgraph.config.shift_terms
        if qgraph.float_nodes:
            raise HybridQuantError(f"cannot lower: nodes left in float ({', '.join(qgraph.float_nodes[:3])} ...)")
        self.raw_readers = {n.inputs[0] for n in self.graph if n.attrs.get("raw_input")}
        self.stats = {"requant_shifts": 0, "luts": 0, "ops": 0}
        self._check()

    # -- lowering checks ----------------------------------------------------------
    def _check(self) -> None:
        for node in self.graph:
            if node.op in ("output",) or node.op in LAYOUT_OPS:
                continue
            self.stats["ops"] += 1
            qp = self.qg.act.get(node.name)
            if node.op == "group_norm":
                raise HybridQuantError(f"cannot lower {node.name}: integer GroupNorm is not implemented")
            if qp is not None and qp.kind != "uniform":
                raise HybridQuantError(f"cannot lower {node.name}: {qp.kind} quantizers have no integer kernel yet")
        # a dry run on one image builds every requantizer (and raises on float multipliers)
        c, h, w = self.graph.meta["input_size"]
        self._requants: dict[str, Requant] = {}
        self._luts: dict[str, Any] = {}
        self.run(torch.zeros(1, c, h, w))

    def _requant(self, name: str, s_in: torch.Tensor, qp: QParams) -> Requant:
        r = self._requants.get(name)
        if r is None:
            r = self._requants[name] = Requant(name, s_in, qp, self.terms if name in self.qg.weight else 1,
                                               self.allow_float)
            self.stats["requant_shifts"] += 1
        return r

    # -- execution ----------------------------------------------------------------
    @torch.no_grad()
    def run(self, x: torch.Tensor, trace: dict[str, IntValue] | None = None) -> tuple[torch.Tensor, IntValue]:
        """Run on a float image batch; returns (dequantized logits, output codes).

        ``trace``, when given, receives every node's output codes.
        """
        vals: dict[str, IntValue] = trace if trace is not None else {}
        wide: dict[str, IntValue] = {}
        deferred: dict[str, tuple[Node, IntValue]] = {}
        for node in self.graph:
            if node.op == "output":
                out = vals[node.inputs[0]]
                logits = (out.centred().double() * _bc(out.scale.double(), out.q, out.axis)).float()
                return logits, out
            qp = self.qg.act.get(node.name)
            if node.op == "input":
                vals[node.name] = IntValue(quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax).to(torch.int64),
                                           qp.scale, qp.zero_point)
                continue
            if node.op in LAYOUT_OPS:
                src = vals[node.inputs[0]]
                if src.axis is not None:
                    raise HybridQuantError(f"cannot lower {node.name}: per-channel codes through a layout op")
                vals[node.name] = IntValue(graph_ops.run_op(node, [src.q]), src.scale, src.zp)
                continue
            acc = self._accumulate(node, vals, wide, deferred)
            if acc is None:  # deferred non-linearity (read only by a per-channel shift)
                continue
            if node.name in self.raw_readers:
                wide[node.name] = acc
            if qp is not None:
                codes = self._requant(node.name, acc.scale, qp)(acc.q, acc.axis)
                vals[node.name] = IntValue(codes, qp.scale, qp.zero_point)
        raise HybridQuantError("graph has no output node")

    def _accumulate(self, node: Node, vals, wide, deferred) -> IntValue | None:
        """The node's exact integer result before requantization (zero point 0)."""
        op, a = node.op, node.attrs
        ins = [vals[i] for i in node.inputs if i in vals]
        if op in ("conv2d", "linear"):
            x = ins[0]
            if x.axis is not None:
                raise HybridQuantError(f"cannot lower {node.name}: per-channel input codes")
            wq = self.qg.weight[node.name]
            w = self.qg.weight_int[node.name].double()
            xc = x.centred().double()
            out = (F.conv2d(xc, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]) if op == "conv2d"
                   else F.linear(xc, w))
            axis = 1 if op == "conv2d" else out.dim() - 1
            if node.name in self.qg.bias_int:
                out = out + _bc(self.qg.bias_int[node.name].double(), out, axis)
            return IntValue(_exact_int(out), x.scale.double() * wq.scale.double(), torch.tensor(0), axis)
        if op == "matmul":
            lhs, rhs = ins
            out = torch.matmul(lhs.centred().double(), rhs.centred().double())
            return IntValue(_exact_int(out), lhs.scale.double() * rhs.scale.double(), torch.tensor(0))
        if op in ("add", "cat"):
            fine = min(float(v.scale.min()) for v in ins)
            parts = []
            for v in ins:
                shift = torch.round(torch.log2(v.scale.double() / fine)).to(torch.int64)
                parts.append(arith.align(v.q, v.zp.to(torch.int64), shift, 0, axis=v.axis))
            out = parts[0] + parts[1] if op == "add" else torch.cat(parts, dim=a["dim"])
            return IntValue(out, torch.tensor(fine, dtype=torch.float64), torch.tensor(0))
        if op == "mul":
            lhs, rhs = ins
            return IntValue(lhs.centred() * rhs.centred(), lhs.scale.double() * rhs.scale.double(), torch.tensor(0))
        if op == "mul_const":
            return IntValue(ins[0].centred(), ins[0].scale.double() * a["value"], torch.tensor(0))
        if op == "global_avg_pool":
            x = ins[0]
            hw = x.q.shape[2] * x.q.shape[3]
            return IntValue(x.centred().sum(dim=(2, 3), keepdim=True), x.scale.double() / hw, torch.tensor(0))
        if op in ELEMENTWISE_OPS:
            return self._elementwise(node, ins[0], deferred)
        if op in ("softmax", "layer_norm"):
            return self._nonlinear(node, ins[0])
        if op == "scale_channels":
            return self._scale_channels(node, vals, wide, deferred)
        raise HybridQuantError(f"cannot lower op {op} ({node.name})")

    def _elementwise(self, node: Node, x: IntValue, deferred) -> IntValue | None:
        qp = self.qg.act.get(node.name)
        if node.name in self.raw_readers:  # per-channel shifts read f(x) itself: per-channel tables
            deferred[node.name] = (node, x)
        if qp is None:
            return None
        table = self._luts.get(node.name)
        in_qp = self.qg.act[self.graph.producer(node.inputs[0]).name]
        if table is None:
            fn = _FN[node.op]
            table = self._luts[node.name] = arith.build_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax,
                                                           float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
            self.stats["luts"] += 1
        codes = arith.apply_lut(x.q, table, in_qp.qmin)
        # already at the output grid: an identity requantization (multiplier 1)
        return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))

    def _nonlinear(self, node: Node, x: IntValue) -> IntValue:
        """Softmax / LayerNorm on the shared integer kernels (exactly what the simulation runs)."""
        qp = self.qg.act[node.name]
        in_qp = self.qg.input_qparams(node)
        if not nonlinear.supported(node, in_qp, qp):
            raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales")
        if node.op == "softmax":
            codes = nonlinear.softmax_codes(x.q, node, in_qp, qp)
        else:
            kernel = self._luts.get(node.name)
            if kernel is None:
                kernel = self._luts[node.name] = nonlinear.LayerNormKernel(node, in_qp, qp)
            codes = kernel(x.q)
        return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))

    def _scale_channels(self, node: Node, vals, wide, deferred) -> IntValue:
        src = node.inputs[0]
        dim = node.attrs["dim"]
        inv_alpha = node.params["inv_alpha"].double()
        qp = self.qg.act[node.name]
        if src in deferred:  # per-channel lookup table: f(x) / alpha_j on the output grid
            prod, x = deferred[src]
            in_qp = self.qg.act[self.graph.producer(prod.inputs[0]).name]
            table = self._luts.get(node.name)
            if table is None:
                out_scale = qp.scale.double() / inv_alpha
                table = self._luts[node.name] = arith.build_channel_lut(
                    _FN[prod.op], float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, out_scale,
                    int(qp.zero_point), qp.qmin, qp.qmax)
                self.stats["luts"] += 1
            axis = dim % x.q.dim()
            codes = arith.apply_channel_lut(x.q, table, in_qp.qmin, axis)
            return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))
        v = wide.get(src) or vals[src]
        axis = dim % v.q.dim()
        if v.axis is not None and v.axis != axis:
            raise HybridQuantError(f"cannot lower {node.name}: channel axes disagree")
        per_channel = v.scale.double().flatten() if v.scale.dim() else v.scale.double().expand(inv_alpha.numel())
        return IntValue(v.centred(), per_channel * inv_alpha, torch.tensor(0), axis)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

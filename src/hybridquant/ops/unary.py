"""Elementwise non-linearities: lookup tables indexed by the input code.

A non-linearity read only through outlier scaling's per-channel shift has no
quantizer of its own: it is ``deferred``, and the shift's per-channel table
(:mod:`.scale_channels`) computes ``f(x) / alpha_j`` directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..primitives import arith
from .registry import OpDef, ProgramKind, register
from .values import Value, c_table_out, code_dtype, np_int, np_small, per_element, table_widths, zero

_UNARY: dict[str, Callable] = {
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "hardswish": F.hardswish,
}


def _in_float64(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # torch's float32 exp/erf take a vector path or a scalar one by an element's place in the tensor, which can
    # differ by an ulp (GELU(5.34375): 5.34375 in a large tensor, 5.3437495 alone); where f(x)/s lands on a
    # rounding tie, that flips a code between the simulation and a table. In float64, then rounded to the
    # input's type, both take the same value.
    return lambda x: fn(x.double()).to(x.dtype)


def unary_fn(node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float function of an elementwise node (its attributes applied): what its lookup tables tabulate,
    so that a table and the simulation compute the same function (evaluated in float64, returned in the input's
    type)."""
    if node.op == "gelu":
        approximate = node.attrs.get("approximate", "none")
        return _in_float64(lambda x: F.gelu(x, approximate=approximate))
    return _in_float64(_UNARY[node.op])


def _lower(ctx, node, op):
    qp = ctx.qg.act.get(node.name)
    if node.name in ctx.raw_readers:  # per-channel shifts read f(x) itself: per-channel tables
        ctx.deferred[node.name] = node
    if qp is None:
        ctx.fill(op, "deferred", node.inputs[:1], {}, {})
        return None
    x = ctx.vals[node.inputs[0]]
    in_qp = ctx.qg.act[ctx.graph.producer(node.inputs[0]).name]
    fn = unary_fn(node)
    if in_qp.grid == "threshold":  # one entry per interval, at its representative value
        table = arith.lut_codes(fn, in_qp.levels.double(), float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
    else:
        table = arith.build_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, float(qp.scale),
                                int(qp.zero_point), qp.qmin, qp.qmax)
    ctx.fill(op, "lut", node.inputs[:1], {}, {"table": np_int(table, code_dtype(qp.qmin, qp.qmax)),
                                               "in_qmin": np_small(in_qp.qmin)})
    # already at the output grid: an identity requantization (multiplier 1)
    return Value(qp.scale.double(), zero())


def _lut(op, c, state, vals, accs):
    return arith.apply_lut(vals[op.inputs[0]], c["table"], int(c["in_qmin"])) - c["requant.zero_point"]


_ONNX = {
    "silu": lambda ex, node, xs: ex.b.add("Mul", [xs[0], ex.b.add("Sigmoid", xs, f"{node.name}.sigmoid")], node.name),
    "gelu": lambda ex, node, xs: ex.b.add("Gelu", xs, node.name, approximate=str(node.attrs.get("approximate", "none"))),
    "sigmoid": lambda ex, node, xs: ex.b.add("Sigmoid", xs, node.name),
    "relu": lambda ex, node, xs: ex.b.add("Relu", xs, node.name),
    "hardswish": lambda ex, node, xs: ex.b.add("HardSwish", xs, node.name),
}

#: the least value of each function with a negative tail, rounded outwards: SiLU x·σ(x) at x ≈ −1.2785,
#: GELU x·Φ(x) at x ≈ −0.7518 (−0.16997), hardswish at x = −1.5
_MIN = {"silu": -0.2785, "gelu": -0.17, "hardswish": -0.375}

def _c_lut(op, em):
    x = op.inputs[0]
    zp, out = c_table_out(op, em)
    return [f"hq_lut({em.codes(x)}, {em.count(x)}, {em.table('table')}, {em.scalar('in_qmin')}, {zp}, {out});"]


register(
    *(OpDef(name, lambda node, i: unary_fn(node)(i[0]), elementwise=True, lower=_lower, onnx=_ONNX[name],
            output_min=_MIN.get(name))
      for name in (*_UNARY, "gelu")),
    ProgramKind("lut", "codes = table[x - in_qmin]; acc = codes - requant.zero_point; then the identity requant",
                run=_lut, table=True, c=_c_lut, widths=table_widths,
                counts=lambda op, program: per_element(op, lookups=1, adds=2)),
    ProgramKind("deferred", "no codes: a non-linearity read only through a consumer's per-channel table "
                            "(channel_lut)", result="none", computes=False),
)

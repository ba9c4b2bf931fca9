"""Reductions over positions: global average pooling (integer sum, 1/HW in the requantization) and sum."""

from __future__ import annotations

import math

import numpy as np

from .registry import OpDef, ProgramKind, register
from .values import Value, centred_inputs, elements, zero, zp_arrays


def _onnx_sum(ex, node, xs):
    axes = ex.b.const(f"{node.name}.axes", np.array([int(d) for d in node.attrs["dims"]], np.int64))
    return ex.b.add("ReduceSum", [xs[0], axes], node.name, keepdims=int(node.attrs["keepdim"]))


def _lower_gap(ctx, node, op):
    x = ctx.vals[node.inputs[0]]
    ctx.fill(op, "global_avg_pool", node.inputs, {}, zp_arrays([x]))
    _, _, h, w = ctx.shapes[node.inputs[0]]
    return Value(x.scale.double() / (h * w), zero())


def _c_gap(op, em):
    x = op.inputs[0]
    _, c, h, w = em.shape(x)
    em.scalar("in_zero_point.0")  # per tensor (a 1-d zero point would lie along W)
    return [f"hq_sum_hw({em.codes(x)}, {em.arg('in_zero_point.0')}, {c}, {h * w}, {em.acc()});"]


register(
    OpDef("global_avg_pool", lambda node, i: i[0].mean(dim=(2, 3), keepdim=True), lower=_lower_gap,
          onnx=lambda ex, node, xs: ex.b.add("GlobalAveragePool", xs, node.name)),
    # no integer lowering yet
    OpDef("sum", lambda node, i: i[0].sum(dim=node.attrs["dims"], keepdim=node.attrs["keepdim"]), onnx=_onnx_sum),
    ProgramKind("global_avg_pool", "acc = sum over H, W of (x - in_zero_point.0), keepdim (1/HW is in the requant); "
                                   "then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0].sum(dim=(2, 3), keepdim=True),
                c=_c_gap, counts=lambda op, program: {"adds": 2 * elements(program[op.inputs[0]].out_shape)},
                widths=lambda op, bounds, done, program: {
                    "acc": bounds[op.inputs[0]] * math.prod(program[op.inputs[0]].out_shape[2:])}),
)

"""Reductions: global average pooling (an integer sum, 1/HW in the requantization) and sum over any dims (the
token sum of MobileViT-v2's linear attention)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import HybridQuantError
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


def _dims(node_or_op, ndim: int) -> list[int]:
    return sorted(int(d) % ndim for d in node_or_op.attrs["dims"])


def _lower_sum(ctx, node, op):
    x = ctx.vals[node.inputs[0]]
    if x.zp.dim() != 0:
        raise HybridQuantError(f"cannot lower {node.name}: sum needs a per-tensor zero point")
    dims = _dims(node, len(ctx.shapes[node.inputs[0]]))
    ctx.fill(op, "sum", node.inputs, {"dims": dims, "keepdim": bool(node.attrs["keepdim"])}, zp_arrays([x]))
    return Value(x.scale.double(), zero())


def _c_reduce(em, x: str, first: int, last: int) -> str:
    """``hq_sum_axis`` of value ``x`` over its dims ``first..last`` (one contiguous block)."""
    shape = em.shape(x)
    outer, n, inner = elements(shape[:first]), elements(shape[first:last + 1]), elements(shape[last + 1:])
    return f"hq_sum_axis({em.codes(x)}, {em.scalar('in_zero_point.0')}, {outer}, {n}, {inner}, {em.acc()});"


def _c_gap(op, em):
    return [_c_reduce(em, op.inputs[0], 2, 3)]


def _c_sum(op, em):
    dims = op.attrs["dims"]
    if dims != list(range(dims[0], dims[-1] + 1)):
        raise em.fail(f"sum over dims {dims}: the C kernel sums one contiguous block of dims")
    return [_c_reduce(em, op.inputs[0], dims[0], dims[-1])]


def _sum_size(op, program) -> int:
    shape = program[op.inputs[0]].out_shape
    return elements([shape[d] for d in op.attrs["dims"]])


register(
    OpDef("global_avg_pool", lambda node, i: i[0].mean(dim=(2, 3), keepdim=True), lower=_lower_gap,
          onnx=lambda ex, node, xs: ex.b.add("GlobalAveragePool", xs, node.name)),
    OpDef("sum", lambda node, i: i[0].sum(dim=node.attrs["dims"], keepdim=node.attrs["keepdim"]), lower=_lower_sum,
          onnx=_onnx_sum),
    ProgramKind("global_avg_pool", "acc = sum over H, W of (x - in_zero_point.0), keepdim (1/HW is in the requant); "
                                   "then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0].sum(dim=(2, 3), keepdim=True),
                c=_c_gap, counts=lambda op, program: {"adds": 2 * elements(program[op.inputs[0]].out_shape)},
                widths=lambda op, bounds, done, program: {
                    "acc": bounds[op.inputs[0]] * math.prod(program[op.inputs[0]].out_shape[2:])}),
    ProgramKind("sum", "acc = sum over dims of (x - in_zero_point.0) (per tensor), keepdim as given; then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0].sum(
                    dim=op.attrs["dims"], keepdim=op.attrs["keepdim"]),
                c=_c_sum, counts=lambda op, program: {"adds": 2 * elements(program[op.inputs[0]].out_shape)},
                widths=lambda op, bounds, done, program: {"acc": bounds[op.inputs[0]] * _sum_size(op, program)}),
)

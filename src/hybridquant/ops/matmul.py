"""Matrix products of two activations (attention): both operands integer codes."""

from __future__ import annotations

import math

import torch

from .conv import c_gemm_temp, exact_dtype
from .registry import OpDef, ProgramKind, register
from .values import Value, centred_inputs, elements, zero, zp_arrays


def _lower(ctx, node, op):
    lhs, rhs = (ctx.vals[i] for i in node.inputs)
    ctx.fill(op, "matmul", node.inputs, {}, zp_arrays([lhs, rhs]))
    return Value(lhs.scale.double() * rhs.scale.double(), zero())


def _prepare(op, c, bounds, program):
    return exact_dtype(program[op.inputs[0]].out_shape[-1], bounds[op.inputs[0]], bounds[op.inputs[1]])


def _run(op, c, dtype, vals, accs):
    lhs, rhs = centred_inputs(op, c, vals)
    return torch.round(torch.matmul(lhs.to(dtype), rhs.to(dtype)).double()).to(torch.int64)


def _macs(op, program):
    return math.prod(op.out_shape) * program[op.inputs[0]].out_shape[-1]


def _c(op, em):
    a, b = op.inputs
    sa, sb = em.shape(a), em.shape(b)
    if sa[:-2] != sb[:-2]:
        raise em.fail(f"batch dims {sa[:-2]} and {sb[:-2]} differ (broadcasting is not supported)")
    m, k, n = sa[-2], sa[-1], sb[-1]
    # temp: one batch's centred operands, a [m][k] and b [k][n], and a tail
    return [f"hq_matmul({em.codes(a)}, {em.arg('in_zero_point.0')}, {em.codes(b)}, {em.arg('in_zero_point.1')}, "
            f"{em.count(a) // (m * k)}, {m}, {k}, {n}, {em.acc()}, {em.temp(c_gemm_temp(m, k, n))});"]


def _widths(op, bounds, done, program):
    a, b = (bounds[i] for i in op.inputs)
    return {"input": max(a, b), "product": a * b, "acc": a * b * program[op.inputs[0]].out_shape[-1]}


register(
    OpDef("matmul", lambda node, i: torch.matmul(i[0], i[1]), mac=True, lower=_lower,
          onnx=lambda ex, node, xs: ex.b.add("MatMul", xs, node.name)),
    ProgramKind("matmul", "acc = (a - in_zero_point.0) @ (b - in_zero_point.1), exact int; then requant",
                run=_run, prepare=_prepare, macs=_macs, c=_c, widths=_widths,
                counts=lambda op, program: {"adds": sum(elements(program[n].out_shape) for n in op.inputs)}),
)

"""Residual adds and concats: operands aligned to the finest scale by left shifts."""

from __future__ import annotations

import torch

from ..primitives import arith, pot_exponent
from .registry import OpDef, ProgramKind, register
from .values import Value, centred_inputs, np_small, zero, zp_arrays


def _lower(ctx, node, op):
    ins = [ctx.vals[i] for i in node.inputs]
    fine = min(float(v.scale.min()) for v in ins)
    shifts = {f"align_shift.{k}": np_small(pot_exponent(v.scale.double() / fine, "round")) for k, v in enumerate(ins)}
    ctx.fill(op, node.op, node.inputs, {"dim": int(node.attrs["dim"])} if node.op == "cat" else {},
             {**zp_arrays(ins), **shifts})
    return Value(torch.tensor(fine, dtype=torch.float64), zero())


def _aligned(op, c, vals):
    return [arith.align(v, 0, c[f"align_shift.{k}"], 0) for k, v in enumerate(centred_inputs(op, c, vals))]


def _add(op, c, state, vals, accs):
    a, b = _aligned(op, c, vals)
    return a + b


def _cat(op, c, state, vals, accs):
    return torch.cat(_aligned(op, c, vals), dim=op.attrs["dim"])


register(
    OpDef("add", lambda node, i: i[0] + i[1], lower=_lower, onnx=lambda ex, node, xs: ex.b.add("Add", xs, node.name)),
    OpDef("cat", lambda node, i: torch.cat(i, dim=node.attrs["dim"]), lower=_lower,
          onnx=lambda ex, node, xs: ex.b.add("Concat", xs, node.name, axis=int(node.attrs["dim"]))),
    ProgramKind("add", "acc = ((a - in_zero_point.0) << align_shift.0) + ((b - in_zero_point.1) << align_shift.1); "
                       "then requant",
                run=_add),
    ProgramKind("cat", "acc = cat([(x_k - in_zero_point.k) << align_shift.k], attrs.dim); then requant",
                run=_cat),
)

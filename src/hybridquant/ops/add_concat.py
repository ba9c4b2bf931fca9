"""Residual adds and concats: operands aligned to the finest scale by left shifts."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..primitives import arith, pot_exponent
from .registry import OpDef, ProgramKind, register
from .values import Value, c_operands, centred_inputs, np_small, per_element, zero, zp_arrays


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


def _c_add(op, em):
    a, b = c_operands(op, em)
    return [f"hq_add({em.codes(a)}, {em.arg('in_zero_point.0')}, {em.arg('align_shift.0')}, {em.codes(b)}, "
            f"{em.arg('in_zero_point.1')}, {em.arg('align_shift.1')}, {em.count(a)}, {em.shape(a)[-1]}, {em.acc()});"]


def _c_cat(op, em):
    dim = op.attrs["dim"] % len(op.out_shape)
    outer = math.prod(op.out_shape[:dim])
    row = math.prod(op.out_shape[dim:])
    lines, offset = [], 0
    for k, name in enumerate(op.inputs):
        part = math.prod(em.shape(name)[dim:])
        lines.append(f"hq_cat_part({em.codes(name)}, {em.arg(f'in_zero_point.{k}')}, {em.arg(f'align_shift.{k}')}, "
                     f"{outer}, {part}, {em.shape(name)[-1]}, {row}, {offset}, {em.acc()});")
        offset += part
    return lines


def _aligned_bounds(op, bounds):
    return [bounds[name] << int(np.max(op.arrays[f"align_shift.{k}"])) for k, name in enumerate(op.inputs)]


def _widths_add(op, bounds, done, program):
    parts = _aligned_bounds(op, bounds)
    return {"aligned": max(parts), "acc": sum(parts)}


def _widths_cat(op, bounds, done, program):
    return {"acc": max(_aligned_bounds(op, bounds))}


register(
    OpDef("add", lambda node, i: i[0] + i[1], lower=_lower, onnx=lambda ex, node, xs: ex.b.add("Add", xs, node.name)),
    OpDef("cat", lambda node, i: torch.cat(i, dim=node.attrs["dim"]), lower=_lower,
          onnx=lambda ex, node, xs: ex.b.add("Concat", xs, node.name, axis=int(node.attrs["dim"]))),
    ProgramKind("add", "acc = ((a - in_zero_point.0) << align_shift.0) + ((b - in_zero_point.1) << align_shift.1); "
                       "then requant",
                run=_add, c=_c_add, widths=_widths_add,
                counts=lambda op, program: per_element(op, shifts=2, adds=3)),
    ProgramKind("cat", "acc = cat([(x_k - in_zero_point.k) << align_shift.k], attrs.dim); then requant",
                run=_cat, c=_c_cat, widths=_widths_cat, counts=lambda op, program: per_element(op, shifts=1, adds=1)),
)

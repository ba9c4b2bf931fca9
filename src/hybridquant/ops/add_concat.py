"""Residual adds and concats (operands aligned to the finest scale by left shifts), and the add of a constant
tensor (an attention-bias table: the constant on the input's grid)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import HybridQuantError
from ..primitives import arith, pot_exponent, quantize, round_half_up
from .registry import OpDef, ProgramKind, register
from .values import Value, absmax, c_operands, centred_inputs, np_int, np_small, per_element, zero, zp_arrays


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


def _const_codes(node, in_scale) -> torch.Tensor:
    """The constant of an ``add_const`` on its input's grid: round(value / s_in), an integer tensor."""
    return round_half_up(node.params["value"].double() / float(in_scale)).to(torch.int64)


def _const_supported(in_qp) -> bool:
    return in_qp is not None and in_qp.grid == "uniform" and in_qp.scale.dim() == 0 and in_qp.zero_point.dim() == 0


def _simulate_add_const(node, in_qp, out_qp):
    if not _const_supported(in_qp):
        return None
    const = _const_codes(node, in_qp.scale)

    def run(inputs):  # the sum on the input's grid, as the program adds it (exact in float)
        q = quantize(inputs[0], in_qp.scale, in_qp.zero_point, in_qp.qmin, in_qp.qmax).to(torch.int64)
        return ((q - in_qp.zero_point.to(torch.int64) + const).double() * float(in_qp.scale)).float()
    return run


def _lower_add_const(ctx, node, op):
    in_qp, x = ctx.qg.input_qparams(node), ctx.vals[node.inputs[0]]
    if not _const_supported(in_qp):
        raise HybridQuantError(f"cannot lower {node.name}: add_const needs a per-tensor uniform input quantizer")
    shape = [1, *ctx.shapes[node.name][1:]]  # one image: the constant as the program adds it
    ctx.fill(op, "add_const", node.inputs, {}, {
        **zp_arrays([x]), "bias": np_int(_const_codes(node, in_qp.scale).expand(shape).contiguous())})
    return Value(x.scale.double(), zero())


def _c_add_const(op, em):
    x = op.inputs[0]
    return [f"hq_add_const({em.codes(x)}, {em.scalar('in_zero_point.0')}, {em.array('bias')}, {em.count(x)}, "
            f"{em.acc()});"]


def _onnx_add_const(ex, node, xs):
    return ex.b.add("Add", [xs[0], ex.b.const(f"{node.name}.value", ex.array(node.params["value"]))], node.name)


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
    OpDef("add_const", lambda node, i: i[0] + node.params["value"], lower=_lower_add_const,
          simulate=_simulate_add_const, onnx=_onnx_add_const),
    ProgramKind("add_const", "acc = (x - in_zero_point.0) + bias (the constant on the input's grid, one image's "
                             "shape); then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0] + c["bias"], c=_c_add_const,
                widths=lambda op, bounds, done, program: {
                    "acc": bounds[op.inputs[0]] + absmax(op.arrays["bias"])},
                counts=lambda op, program: per_element(op, adds=2)),
    ProgramKind("add", "acc = ((a - in_zero_point.0) << align_shift.0) + ((b - in_zero_point.1) << align_shift.1); "
                       "then requant",
                run=_add, c=_c_add, widths=_widths_add,
                counts=lambda op, program: per_element(op, shifts=2, adds=3)),
    ProgramKind("cat", "acc = cat([(x_k - in_zero_point.k) << align_shift.k], attrs.dim); then requant",
                run=_cat, c=_c_cat, widths=_widths_cat, counts=lambda op, program: per_element(op, shifts=1, adds=1)),
)

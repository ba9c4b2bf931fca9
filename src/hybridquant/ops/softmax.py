"""Softmax: an integer kernel in 32 bits (exp table, one sum, one reciprocal per row, multiplies and rounding
shifts) in the program and the simulation."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import HybridQuantError
from ..primitives import arith, dequantize, pot_exponent, quantize
from .registry import OpDef, ProgramKind, register
from .values import FRAC_BITS, Value, absmax, elements, np_int, np_small, pot_uniform, zero


def supported(node, in_qp, out_qp) -> bool:
    """Whether ``node`` can run on the integer kernel: power-of-two scales, unsigned output from 0."""
    return (pot_uniform(in_qp, out_qp) and in_qp.scale.dim() == 0 and int(out_qp.zero_point) == 0
            and out_qp.qmin == 0)


def out_exp(out_qp) -> int:
    """``m`` with the softmax output scale ``2^-m``."""
    return -int(pot_exponent(out_qp.scale, "exact"))


def exp_table(in_qp) -> torch.Tensor:
    """The exp table of every possible spread of the input codes: the one the simulation and the program use."""
    return arith.softmax_exp_table(float(in_qp.scale), in_qp.qmax - in_qp.qmin + 1, FRAC_BITS)


def _simulate(node, in_qp, out_qp):
    if not supported(node, in_qp, out_qp):
        return None
    table = exp_table(in_qp)

    def run(inputs):
        q = quantize(inputs[0], in_qp.scale, in_qp.zero_point, in_qp.qmin, in_qp.qmax).to(torch.int64)
        codes = arith.int_softmax(q, int(in_qp.zero_point), float(in_qp.scale), out_exp(out_qp), out_qp.qmax,
                                  dim=node.attrs["dim"], frac_bits=FRAC_BITS, table=table)
        return dequantize(codes, out_qp.scale, out_qp.zero_point)
    return run


def _lower(ctx, node, op):
    qp, in_qp = ctx.qg.act[node.name], ctx.qg.input_qparams(node)
    if not supported(node, in_qp, qp):
        raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales")
    ctx.fill(op, "softmax", node.inputs[:1], {"dim": int(node.attrs["dim"])}, {
        "exp_table": np_int(exp_table(in_qp)), "frac_bits": np_small(FRAC_BITS), "out_exp": np_small(out_exp(qp)),
        "out_qmax": np_small(qp.qmax)})
    return Value(qp.scale.double(), zero())


def _run(op, c, state, vals, accs):
    codes = arith.int_softmax(vals[op.inputs[0]], 0, 0.0, int(c["out_exp"]), int(c["out_qmax"]), dim=op.attrs["dim"],
                              frac_bits=int(c["frac_bits"]), table=c["exp_table"])
    return codes - c["requant.zero_point"]


def _c(op, em):
    x = op.inputs[0]
    shape = em.shape(x)
    dim = op.attrs["dim"] % len(shape)
    table = np.asarray(op.arrays["exp_table"])
    return [f"hq_softmax({em.codes(x)}, {math.prod(shape[:dim])}, {shape[dim]}, {math.prod(shape[dim + 1:])}, "
            f"{em.array('exp_table')}, {table.size}, {em.scalar('out_exp')}, {em.scalar('out_qmax')}, "
            f"{em.scalar('requant.zero_point')}, {em.acc()});"]


def _counts(op, program):
    n = elements(op.out_shape)
    rows = n // op.out_shape[op.attrs["dim"] % len(op.out_shape)]
    # per element: the max, the offset, the lookup, the sum, the product, its rounding shift, the clamp
    return {"comparisons": 2 * n - rows, "adds": 4 * n - rows, "lookups": n, "multiplies": n, "shifts": n,
            "divisions": rows}


def _widths(op, bounds, done, program):
    shape = program[op.inputs[0]].out_shape
    e, n = absmax(op.arrays["exp_table"]), shape[op.attrs["dim"] % len(shape)]
    rb = arith.SOFTMAX_RECIPROCAL_BITS
    shift = rb - int(np.asarray(op.arrays["out_exp"]))
    return {"exp": e, "sum": n * e, "reciprocal": ((1 << rb) + e // 2) // max(e, 1),
            "product": (1 << rb) + e // 2 + ((1 << shift) >> 1),
            "acc": int(np.asarray(op.arrays["out_qmax"])) + abs(int(np.asarray(op.arrays["requant.zero_point"])))}


register(
    OpDef("softmax", lambda node, i: torch.softmax(i[0], dim=node.attrs["dim"]), lower=_lower, simulate=_simulate, unit_interval=True, kernel_output=True,
          onnx=lambda ex, node, xs: ex.b.add("Softmax", xs, node.name, axis=int(node.attrs["dim"]))),
    ProgramKind("softmax", "along attrs.dim, int32 throughout: d = x - max(x); E = exp_table[d + len - 1]; "
                           "S = sum E; R = (2^30 + S // 2) // S (one reciprocal per row); codes = min(out_qmax, srr(E R, "
                           "30 - out_exp)); then the identity requant (arith.int_softmax)", run=_run, category="softmax_constants", c=_c,
                counts=_counts,
                widths=_widths),
)

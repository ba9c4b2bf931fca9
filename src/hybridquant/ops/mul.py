"""Elementwise products: of two activations, or of one with a constant (a number, folded into its
requantization; a constant tensor — a layer scale — is folded into the layer before it at capture)."""

from __future__ import annotations

import numpy as np

from ..errors import HybridQuantError
from .registry import OpDef, ProgramKind, register
from .values import Value, c_centred, centred_inputs, elements, per_element, zero, zp_arrays


def _lower_mul(ctx, node, op):
    lhs, rhs = (ctx.vals[i] for i in node.inputs)
    ctx.fill(op, "mul", node.inputs, {}, zp_arrays([lhs, rhs]))
    return Value(lhs.scale.double() * rhs.scale.double(), zero())


def const_value(node):
    """The constant of a ``mul_const`` node: a number (``attrs``) or a tensor (``params``)."""
    return node.params["value"] if "value" in node.params else node.attrs["value"]


def _lower_mul_const(ctx, node, op):
    if "value" in node.params:
        raise HybridQuantError(f"cannot lower {node.name}: a product with a constant tensor that does not fold into "
                               "the layer before it")
    x = ctx.vals[node.inputs[0]]
    ctx.fill(op, "mul_const", node.inputs, {}, zp_arrays([x]))
    return Value(x.scale.double() * node.attrs["value"], zero())


def _mul(op, c, state, vals, accs):
    a, b = centred_inputs(op, c, vals)
    return a * b


def _onnx_mul_const(ex, node, xs):
    v = const_value(node)
    value = ex.b.const(f"{node.name}.value", ex.array(v) if "value" in node.params else np.array(v, np.float32))
    return ex.b.add("Mul", [xs[0], value], node.name)


def broadcast_block(shape: list[int], out: list[int]) -> tuple[int, int] | None:
    """The dims ``[first, end)`` of ``out`` along which ``shape`` is broadcast, when they are one contiguous block
    (``(0, 0)``: not broadcast); None for another pattern."""
    shape = [1] * (len(out) - len(shape)) + list(shape)
    dims = [d for d, (s, o) in enumerate(zip(shape, out, strict=True)) if s != o]
    if not dims:
        return 0, 0
    first, end = dims[0], dims[-1] + 1
    if any(shape[d] != 1 for d in range(first, end)):
        return None
    return first, end


def _c_mul(op, em):
    a, b = op.inputs
    za, zb = "in_zero_point.0", "in_zero_point.1"
    if em.shape(a) == em.shape(b):
        return [f"hq_mul({em.codes(a)}, {em.arg(za)}, {em.codes(b)}, {em.arg(zb)}, "
                f"{em.count(a)}, {em.shape(a)[-1]}, {em.acc()});"]
    out = op.out_shape
    if em.shape(b) == list(out):  # the broadcast operand second
        a, b, za, zb = b, a, zb, za
    block = broadcast_block(em.shape(b), out) if em.shape(a) == list(out) else None
    if block is None:
        raise em.fail(f"shapes {em.shape(a)} and {em.shape(b)}: the C kernel broadcasts one operand along one "
                      "block of dims")
    first, end = block
    outer, mid, inner = elements(out[:first]), elements(out[first:end]), elements(out[end:])
    return [f"hq_mul_bcast({em.codes(a)}, {em.scalar(za)}, {em.codes(b)}, {em.scalar(zb)}, {outer}, {mid}, "
            f"{inner}, {em.acc()});"]


register(
    OpDef("mul", lambda node, i: i[0] * i[1], lower=_lower_mul, onnx=lambda ex, node, xs: ex.b.add("Mul", xs, node.name)),
    OpDef("mul_const", lambda node, i: i[0] * const_value(node), lower=_lower_mul_const, onnx=_onnx_mul_const,
          is_identity=lambda node: node.attrs.get("value") == 1.0),
    ProgramKind("mul", "acc = (a - in_zero_point.0) * (b - in_zero_point.1); then requant", run=_mul, c=_c_mul,
                counts=lambda op, program: per_element(op, multiplies=1, adds=2),
                widths=lambda op, bounds, done, program: {"acc": bounds[op.inputs[0]] * bounds[op.inputs[1]]}),
    ProgramKind("mul_const", "acc = x - in_zero_point.0 (the constant is folded into the requant); then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0], c=c_centred,
                counts=lambda op, program: per_element(op, adds=1),
                widths=lambda op, bounds, done, program: {"acc": bounds[op.inputs[0]]}),
)

"""Outlier scaling's per-channel factors (``x / alpha_j``): a per-channel requantization of the producer's
accumulator (or codes), or a per-channel lookup table after a deferred non-linearity."""

from __future__ import annotations

import math

import numpy as np

from ..errors import HybridQuantError
from ..primitives import arith
from .registry import OpDef, ProgramKind, register
from .unary import unary_fn
from .values import (
    Value,
    c_centred,
    c_table_out,
    code_dtype,
    np_int,
    np_small,
    per_element,
    table_widths,
    zero,
    zp_arrays,
)


def _float(node, inputs):
    # x / alpha along the channel dim (dim 1 for NCHW, last for tokens)
    x, dim = inputs[0], node.attrs["dim"]
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * node.params["inv_alpha"].reshape(shape)


def _lower(ctx, node, op):
    src, qp = node.inputs[0], ctx.qg.act[node.name]
    inv_alpha = node.params["inv_alpha"].double()
    axis = node.attrs["dim"] % len(ctx.shapes[src])
    if src in ctx.deferred:  # per-channel lookup table: f(x) / alpha_j on the output grid
        prod = ctx.deferred[src]
        x = ctx.vals[prod.inputs[0]]
        in_qp = ctx.qg.act[ctx.graph.producer(prod.inputs[0]).name]
        out_scale, fn = qp.scale.double() / inv_alpha, unary_fn(prod)
        if in_qp.grid == "threshold":  # one column per interval, at its representative value
            table = arith.lut_codes(fn, in_qp.levels.double().unsqueeze(0), out_scale.reshape(-1, 1),
                                    int(qp.zero_point), qp.qmin, qp.qmax)
        else:
            table = arith.build_channel_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, out_scale,
                                            int(qp.zero_point), qp.qmin, qp.qmax)
        ctx.fill(op, "channel_lut", prod.inputs[:1], {"axis": axis, "fused": prod.name, "fused_op": prod.op},
                 {"table": np_int(table, code_dtype(qp.qmin, qp.qmax)), "in_qmin": np_small(in_qp.qmin)})
        return Value(qp.scale.double(), zero())
    v = ctx.wide.get(src) or ctx.vals[src]
    if v.axis is not None and v.axis != axis:
        raise HybridQuantError(f"cannot lower {node.name}: channel axes disagree")
    ctx.fill(op, "channel_requant", [src], {"axis": axis, "reads": "accumulator" if src in ctx.wide else "codes"},
             zp_arrays([v]))
    per_channel = v.scale.double().flatten() if v.scale.dim() else v.scale.double().expand(inv_alpha.numel())
    return Value(per_channel * inv_alpha, zero(), axis)


def _channel_lut(op, c, state, vals, accs):
    return (arith.apply_channel_lut(vals[op.inputs[0]], c["table"], int(c["in_qmin"]), op.attrs["axis"])
            - c["requant.zero_point"])


def _channel_requant(op, c, state, vals, accs):
    src = op.inputs[0]
    return (accs[src] if op.attrs["reads"] == "accumulator" else vals[src]) - c["in_zero_point.0"]


def _onnx(ex, node, xs):
    shape = [1] * ex.rank(node.name)
    shape[int(node.attrs["dim"])] = -1
    inv_alpha = ex.b.const(f"{node.name}.inv_alpha", ex.array(ex.params(node)["inv_alpha"]).reshape(shape))
    return ex.b.add("Mul", [xs[0], inv_alpha], node.name)


def _c_channel_lut(op, em):
    x = op.inputs[0]
    channels, size = np.asarray(op.arrays["table"]).shape
    shape = em.shape(x)
    inner = math.prod(shape[op.attrs["axis"] % len(shape) + 1:])
    zp, out = c_table_out(op, em)
    return [f"hq_channel_lut({em.codes(x)}, {em.count(x)}, {inner}, {channels}, {em.table('table')}, {size}, "
            f"{em.scalar('in_qmin')}, {zp}, {out});"]


def _c_channel_requant(op, em):
    src = op.inputs[0]
    return c_centred(op, em, em.acc(src) if op.attrs["reads"] == "accumulator" else em.codes(src))


def _widths_channel_requant(op, bounds, done, program):
    src = op.inputs[0]
    return {"acc": done[src]["acc"] if op.attrs["reads"] == "accumulator" else bounds[src]}


register(
    OpDef("scale_channels", _float, lower=_lower, onnx=_onnx, channel_scale=lambda node: node.params["inv_alpha"]),
    ProgramKind("channel_lut", "codes = table[c, x - in_qmin] for channel c along attrs.axis; then the identity "
                               "requant", run=_channel_lut, table=True, c=_c_channel_lut, widths=table_widths,
                counts=lambda op, program: per_element(op, lookups=1, adds=2)),
    ProgramKind("channel_requant", "acc = v - in_zero_point.0, v = the input's accumulator (attrs.reads) or codes; "
                                 "then a per-channel requant along attrs.axis", run=_channel_requant,
                c=_c_channel_requant, widths=_widths_channel_requant,
                counts=lambda op, program: per_element(op, adds=1)),
)

"""Convolution and linear layers: integer weights, int32 bias, exact accumulation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..primitives import _bcast
from .registry import OpDef, ProgramKind, register
from .values import Value, absmax, centred_inputs, code_dtype, elements, np_int, zero, zp_arrays


def _conv2d(node, inputs):
    a, p = node.attrs, node.params
    return F.conv2d(inputs[0], p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])


def _linear(node, inputs):
    return F.linear(inputs[0], node.params["weight"], node.params.get("bias"))


def _lower(ctx, node, op):
    x, kind = ctx.vals[node.inputs[0]], node.op
    wq = ctx.qg.weight[node.name]
    arrays = {"weight": np_int(ctx.qg.weight_int[node.name], code_dtype(wq.qmin, wq.qmax)), **zp_arrays([x])}
    if node.name in ctx.qg.bias_int:
        arrays["bias"] = np_int(ctx.qg.bias_int[node.name])
    attrs = {k: node.attrs[k] for k in ("stride", "padding", "dilation", "groups")} if kind == "conv2d" else {}
    # the exports pack weights whose width is not a multiple of 8
    ctx.fill(op, kind, node.inputs[:1], {**attrs, "weight_bits": int(wq.bits)}, arrays)
    channel_axis = 1 if kind == "conv2d" else len(ctx.shapes[node.name]) - 1
    return Value(x.scale.double() * wq.scale.double(), zero(), channel_axis)


def exact_dtype(terms: int, a_bound: int, b_bound: int) -> torch.dtype:
    """float32 when every partial sum of ``terms`` products is an exact float32 integer, else float64
    (exact below 2^53)."""
    return torch.float32 if terms * a_bound * b_bound < (1 << 24) else torch.float64


def _prepare(op, c, bounds, program):
    # the weights' actual max |w| bounds the products (a code range's qmax would miss |qmin| = qmax + 1)
    w = c["weight"]
    dtype = exact_dtype(math.prod(w.shape[1:]), bounds[op.inputs[0]], int(w.abs().max()) if w.numel() else 0)
    c["weight"] = w.to(dtype)
    return dtype


def _run(op, c, dtype, vals, accs):
    xc, a = centred_inputs(op, c, vals)[0].to(dtype), op.attrs
    out = (F.conv2d(xc, c["weight"], None, a["stride"], a["padding"], a["dilation"], a["groups"])
           if op.kind == "conv2d" else F.linear(xc, c["weight"])).double()
    if "bias" in c:
        out = out + _bcast(c["bias"].double(), out, 1 if op.kind == "conv2d" else out.dim() - 1)
    return torch.round(out).to(torch.int64)


def _macs(op, program):
    return math.prod(op.out_shape) * math.prod(op.arrays["weight"].shape[1:])


def _counts(op, program):
    # centring of the input, then the bias
    return {"adds": elements(program[op.inputs[0]].out_shape) + (elements(op.out_shape) if "bias" in op.arrays else 0)}


def _onnx_conv2d(ex, node, xs):
    a = node.attrs
    inputs = [xs[0], ex.weight(node)]
    bias = ex.bias(node)
    if bias is not None:
        inputs.append(bias)
    ph, pw = (int(v) for v in a["padding"])
    kernel = [int(v) for v in ex.params(node)["weight"].shape[2:]]
    return ex.b.add("Conv", inputs, node.name, strides=[int(v) for v in a["stride"]], pads=[ph, pw, ph, pw],
                    dilations=[int(v) for v in a["dilation"]], group=int(a["groups"]), kernel_shape=kernel)


def _onnx_linear(ex, node, xs):
    b, name, bias = ex.b, node.name, ex.bias(node)
    if ex.rank(node.inputs[0]) == 2:
        return b.add("Gemm", [xs[0], ex.weight(node)] + ([bias] if bias is not None else []), name, transB=1)
    y = b.add("MatMul", [xs[0], ex.weight(node, transpose=True)], name if bias is None else f"{name}.matmul")
    return y if bias is None else b.add("Add", [y, bias], name)


def _conv_weight_layout(node):
    if node.attrs["groups"] == 1:
        return "dense"
    return "depthwise" if node.params["weight"].shape[1] == 1 else None  # grouped: neither


def _conv_columns(node, x):
    a, w = node.attrs, node.params["weight"]
    cols = F.unfold(x, w.shape[-2:], a["dilation"], a["padding"], a["stride"])  # [B, Cin·kh·kw, L]
    if _conv_weight_layout(node) == "depthwise":  # [B, C·k, L] -> [C, k, B·L]
        c = x.shape[1]
        return cols.reshape(x.shape[0], c, -1, cols.shape[-1]).permute(1, 2, 0, 3).flatten(2)
    return cols.permute(1, 0, 2).flatten(1)  # [B, K, L] -> [K, B·L]


def _conv_pointwise(node):
    a = node.attrs
    return a["groups"] == 1 and tuple(node.params["weight"].shape[-2:]) == (1, 1) and not any(a["padding"])


#: the C matrix products' tiles: rows of the broadcast operand (``HQ_TR`` in hq_kernels.h) by lanes of the other
#: (``HQ_TN``)
C_TILE_ROWS, C_TILE_LANES = 4, 16
#: the largest stride along rows that hq_conv2d takes (``HQ_MAX_STRIDE``)
C_MAX_STRIDE = 16


def c_rows(m: int) -> int:
    """The rows of a C matrix product's broadcast operand, ``m`` padded with zero rows (``HQ_ROWS``)."""
    return -(-m // C_TILE_ROWS) * C_TILE_ROWS


def c_gemm_temp(m: int, k: int, n: int) -> int:
    """int32 values of the temp buffer of a C matrix product whose operands are copied there: the broadcast
    operand [c_rows(m)][k], the other [k][n] and the tail of its last partial tile [k][C_TILE_LANES]; n = 0:
    the other is weights in column blocks, one block [k][C_TILE_LANES] unpacked at a time instead."""
    return (c_rows(m) + (n or C_TILE_LANES) + C_TILE_LANES) * k


def _c_conv2d(op, em):
    x = op.inputs[0]
    _, cin, h, w = em.shape(x)
    _, cout, ho, wo = op.out_shape
    kh, kw = op.arrays["weight"].shape[-2:]
    a = op.attrs
    row, pixels = op.arrays["weight"][0].size, ho * wo
    sh, sw = a["stride"]
    dh, dw = a["dilation"]
    pointwise = (kh, kw, sh, sw, *a["padding"]) == (1, 1, 1, 1, 0, 0)
    if sw > C_MAX_STRIDE:
        raise em.fail(f"a stride of {sw} along rows; the C kernel takes up to {C_MAX_STRIDE}")
    # hq_conv2d's temp (int32): the stride phases of one padded input plane [sh * sw][hq][wq] ...
    hq, wq = -(-((ho - 1) * sh + (kh - 1) * dh + 1) // sh), -(-((wo - 1) * sw + (kw - 1) * dw + 1) // sw)
    phases = sh * sw * hq * wq
    if a["groups"] != 1:  # ... the flat output [ho][wq], one row of weights
        temp = em.temp(phases + ho * wq + row)
    elif pixels >= C_TILE_LANES:  # lanes along the pixels: a tile's rows of weights, a tail, then (unless
        # pointwise) the patches and the phases
        temp = em.temp((C_TILE_ROWS + C_TILE_LANES) * row + (0 if pointwise else pixels * row + phases))
    else:  # lanes along the output channels: the patches, a block of the weights (stored in blocks), a tail
        temp = em.temp(c_gemm_temp(pixels, row, 0))
    bias = em.array("bias") if em.has("bias") else "0"
    weights = em.weights(blocked=a["groups"] == 1 and pixels < C_TILE_LANES)
    return [f"{{ static const hq_weights w = {weights};",
            f"  hq_conv2d({em.codes(x)}, {em.scalar('in_zero_point.0')}, {cin}, {h}, {w}, &w, {bias}, {cout}, {kh}, "
            f"{kw}, {sh}, {sw}, {a['padding'][0]}, {a['padding'][1]}, {dh}, {dw}, {a['groups']}, {ho}, {wo}, "
            f"{em.acc()}, {temp}); }}"]


def _c_linear(op, em):
    x = op.inputs[0]
    k = em.shape(x)[-1]
    n = op.arrays["weight"].shape[0]
    rows = em.count(x) // k
    bias = em.array("bias") if em.has("bias") else "0"
    # temp: the centred inputs [rows][k], a block of the weights (stored in column blocks), a tail
    return [f"{{ static const hq_weights w = {em.weights(blocked=True)};",
            f"  hq_linear({em.codes(x)}, {em.arg('in_zero_point.0')}, {rows}, {k}, &w, {bias}, {n}, "
            f"{em.acc()}, {em.temp(c_gemm_temp(rows, k, 0))}); }}"]


def _widths(op, bounds, done, program):
    x = bounds[op.inputs[0]]
    w = np.abs(np.asarray(op.arrays["weight"]).astype(np.int64)).reshape(op.arrays["weight"].shape[0], -1)
    bias = np.abs(np.asarray(op.arrays["bias"]).astype(np.int64)) if "bias" in op.arrays else np.zeros(len(w), np.int64)
    acc = x * w.sum(axis=1) + bias  # per output channel
    return {"input": x, "product": x * absmax(w), "acc": int(acc.max()) if w.size else 0,
            "acc_per_channel": acc.tolist()}


register(
    OpDef("conv2d", _conv2d, mac=True, lower=_lower, onnx=_onnx_conv2d, weighted=True, channel_axis=1,
          weight_layout=_conv_weight_layout, columns=_conv_columns, pointwise=_conv_pointwise),
    OpDef("linear", _linear, mac=True, lower=_lower, onnx=_onnx_linear, weighted=True, channel_axis=-1,
          weight_layout=lambda node: "dense", columns=lambda node, x: x.reshape(-1, x.shape[-1]).t(),
          pointwise=lambda node: True),
    ProgramKind("conv2d", "acc = conv2d(x - in_zero_point.0, weight) + bias, exact int; then requant",
                run=_run, prepare=_prepare, macs=_macs, counts=_counts, c=_c_conv2d, widths=_widths),
    ProgramKind("linear", "acc = (x - in_zero_point.0) @ weight^T + bias, exact int; then requant",
                run=_run, prepare=_prepare, macs=_macs, counts=_counts, c=_c_linear, widths=_widths),
)

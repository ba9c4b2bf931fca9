"""LayerNorm: an integer kernel in 32 bits (a floor mean and its remainder, a rounded square root and one
reciprocal per row) in the program and the simulation; PTF's per-channel input scales enter as left shifts."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..primitives import arith, dequantize, pot_exponent, quantize
from .registry import OpDef, ProgramKind, register
from .values import Value, absmax, elements, np_int, np_small, pot_uniform, zero


def _ptf_shift(in_qp) -> torch.Tensor:
    """PTF: per-channel input scales base·2^c_j enter as left shifts c_j (all 0 for a per-tensor scale)."""
    scale = in_qp.scale.double().reshape(-1)
    if scale.numel() == 1:
        return torch.zeros((), dtype=torch.int64)
    return pot_exponent(scale / scale.min(), "round")


def _in_bound(in_qp) -> int:
    """The largest |input code − zero point| after the PTF shifts."""
    zp = int(in_qp.zero_point)
    return max(in_qp.qmax - zp, zp - in_qp.qmin) << int(_ptf_shift(in_qp).max())


def supported(node, in_qp, out_qp) -> bool:
    """Whether ``node`` can run on the integer kernel: power-of-two scales, one normalised dim, one input zero
    point, per-channel input scales only along the normalised dim, and a row that fits the int32 kernel
    (:func:`~hybridquant.primitives.arith.layernorm_fits`)."""
    if not (pot_uniform(in_qp, out_qp) and len(node.attrs["shape"]) == 1 and in_qp.zero_point.dim() == 0
            and (in_qp.scale.dim() == 0 or in_qp.axis in (-1, None))):
        return False
    return arith.layernorm_fits(int(node.attrs["shape"][0]), _in_bound(in_qp))


class LayerNormKernel:
    """Integer LayerNorm of one node; constants are built once from its float affine."""

    def __init__(self, node, in_qp, out_qp):
        channels = int(node.attrs["shape"][0])
        # the PTF shifts, plus a common shift up where the int32 row has room (precision of the variance)
        up = arith.layernorm_headroom(channels, _in_bound(in_qp))
        base = float(in_qp.scale.double().min()) / 2**up
        self.shift = _ptf_shift(in_qp) + up
        gamma = node.params.get("weight", torch.ones(channels))
        beta = node.params.get("bias", torch.zeros(channels))
        self.const = arith.layernorm_constants(gamma, beta, node.attrs["eps"], base, channels, float(out_qp.scale),
                                               out_qp.qmin, out_qp.qmax, out_qp.zero_point)
        self.in_zp = int(in_qp.zero_point)
        self.out_qp = out_qp

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        o, k = self.out_qp, self.const
        return arith.int_layernorm(q, self.in_zp, self.shift, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"],
                                   int(o.zero_point), o.qmin, o.qmax)


def _simulate(node, in_qp, out_qp):
    if not supported(node, in_qp, out_qp):
        return None
    kernel = LayerNormKernel(node, in_qp, out_qp)

    def run(inputs):
        q = quantize(inputs[0], in_qp.scale, in_qp.zero_point, in_qp.qmin, in_qp.qmax, in_qp.axis).to(torch.int64)
        return dequantize(kernel(q), out_qp.scale, out_qp.zero_point)
    return run


def _lower(ctx, node, op):
    qp, in_qp = ctx.qg.act[node.name], ctx.qg.input_qparams(node)
    if not supported(node, in_qp, qp):
        raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales and "
                               "rows whose sum of squares fits int32")
    k = LayerNormKernel(node, in_qp, qp)
    ctx.fill(op, "layer_norm", node.inputs[:1], {"dim": -1}, {
        "in_zero_point": np_small(k.in_zp), "ptf_shift": np_small(k.shift), "gamma_q": np_small(k.const["gamma_q"]),
        "beta_q": np_int(k.const["beta_q"]), "eps_q": np_int(k.const["eps_q"]), "out_shift": np_small(k.const["out_shift"]),
        "out_zero_point": np_small(qp.zero_point), "out_qmin": np_small(qp.qmin), "out_qmax": np_small(qp.qmax)})
    return Value(qp.scale.double(), zero())


def _run(op, c, state, vals, accs):
    codes = arith.int_layernorm(
        vals[op.inputs[0]], int(c["in_zero_point"]), c["ptf_shift"], c["gamma_q"], c["beta_q"], int(c["eps_q"]),
        int(c["out_shift"]), int(c["out_zero_point"]), int(c["out_qmin"]), int(c["out_qmax"]))
    return codes - c["requant.zero_point"]


def _float(node, inputs):
    return F.layer_norm(inputs[0], node.attrs["shape"], node.params.get("weight"), node.params.get("bias"),
                        node.attrs["eps"])


def _onnx(ex, node, xs):
    p, name, shape = ex.params(node), node.name, [int(v) for v in node.attrs["shape"]]
    w = ex.array(p["weight"]) if "weight" in p else np.ones(shape, np.float32)
    inputs = [xs[0], ex.b.const(f"{name}.weight", w)]
    if "bias" in p:
        inputs.append(ex.b.const(f"{name}.bias", ex.array(p["bias"])))
    return ex.b.add("LayerNormalization", inputs, name, axis=-len(shape), epsilon=float(node.attrs["eps"]))


def _c(op, em):
    x = op.inputs[0]
    channels = em.shape(x)[-1]
    ptf = np.asarray(op.arrays["ptf_shift"])
    return [f"hq_layer_norm({em.codes(x)}, {em.count(x) // channels}, {channels}, {em.scalar('in_zero_point')}, "
            f"{em.array('ptf_shift')}, {ptf.size}, {em.scalar('eps_q')}, {em.array('gamma_q')}, "
            f"{em.array('beta_q')}, {em.scalar('out_shift')}, "
            f"{em.scalar('out_zero_point')}, {em.scalar('out_qmin')}, {em.scalar('out_qmax')}, "
            f"{em.scalar('requant.zero_point')}, {em.acc()});"]


def row_widths(op, x: int, count: int, square_shift: int = 0) -> dict[str, int]:
    """Magnitudes inside the integer norm kernel of ``op`` (LayerNorm or GroupNorm) for rows of ``count`` values
    within ``±x`` after the input shifts, squares rounded down by ``square_shift`` bits."""
    g = {k: np.asarray(v).astype(np.int64) for k, v in op.arrays.items()}
    squares = (count * (x * x + 1) >> square_shift) + (count // 2 + 1 if square_shift else 0)
    recip_rows = math.isqrt(1 << 29)  # √W ≥ 2^14.5 once V ≥ 2; V ≤ 1 gives r = 2^15
    recip = (1 << arith.LN_RECIPROCAL_BITS) // recip_rows
    n = (1 << (arith.LN_FRAC_BITS + arith.norm_extra_bits(count))) + 2
    shift = int(g["out_shift"])
    t = arith.fraction_shift(count)  # longer rows: the mean's fraction from shifted-down remainders
    return {"shifted": x, "sum": count * x, "centred": 2 * x + 1, "square": (2 * x + 1) ** 2,
            "remainder_square": count * count if t == 0 else 0,
            "squares": squares, "variance": squares + int(g["eps_q"]), "scaled_variance": (1 << 31) - 1,
            "root": 46341, "reciprocal": 1 << arith.LN_RECIPROCAL_BITS,
            "mean_fraction": (count >> t) * recip + (count >> t) // 2,
            "product": (1 << arith.LN_RECIPROCAL_BITS) + (1 << 17), "normalised": n,
            "affine": n * absmax(g["gamma_q"]) + absmax(g["beta_q"]) + ((1 << shift) >> 1),
            "acc": abs(int(g["out_qmax"])) + abs(int(g["out_qmin"])) + abs(int(g["requant.zero_point"]))}


def row_counts(count: int, rows: int) -> dict[str, int]:
    """Operations of the integer norm kernel on ``rows`` rows of ``count`` values: per row the centring, shift,
    sum, deviation, square and its sum, then the variance, bit length (31 steps), square root (16 steps of two
    adds and two shifts), reciprocal and the mean's fraction (divisions), and per element the product, two
    rounding shifts, the affine step and the clamp."""
    c = count
    per_row = {"adds": 9 * c + 35, "shifts": 3 * c + 33, "multiplies": 3 * c + 3, "divisions": 4,
               "comparisons": 2 * c + 48}
    return {k: v * rows for k, v in per_row.items()}


def _counts(op, program):
    c = op.out_shape[-1]
    return row_counts(c, elements(op.out_shape) // c)


def _widths(op, bounds, done, program):
    return row_widths(op, bounds[op.inputs[0]] << int(np.asarray(op.arrays["ptf_shift"]).max()),
                      program[op.inputs[0]].out_shape[-1])


register(
    OpDef("layer_norm", _float, lower=_lower, simulate=_simulate, onnx=_onnx, channel_axis=-1, norm="channels",
          kernel_output=True),
    ProgramKind("layer_norm", "over the last dim (C channels), int32 throughout: x_j = (x_j - in_zero_point) << "
                              "ptf_shift_j; S = sum x; m = S // C; rem = S - m C; d_j = x_j - m; V = sum d^2 - "
                              "rem^2 // C + eps_q; p = min(15, (31 - bit_length(V)) // 2); W = V << 2p; t = isqrt(W) "
                              "(floor); r = max(1, t + (W - t^2 > t)); R = 2^30 // r; k = (rem R + C // 2) // C; "
                              "n_j = srr(d_j R - k, 15 - p); codes = clamp(srr(n_j gamma_q_j + beta_q_j, out_shift) + "
                              "out_zero_point, out_qmin, out_qmax); then the identity requant (arith.int_layernorm)",
                run=_run, category="layernorm_constants", c=_c, widths=_widths, counts=_counts),
)

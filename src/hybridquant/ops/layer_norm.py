"""LayerNorm: an integer kernel (integer mean and variance, floor square root, rounded division) in the
program and the simulation; PTF's per-channel input scales enter as left shifts."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..primitives import arith, dequantize, pot_exponent, quantize
from .registry import OpDef, ProgramKind, register
from .values import FRAC_BITS, Value, absmax, np_int, np_small, pot_uniform, zero


def supported(node, in_qp, out_qp) -> bool:
    """Whether ``node`` can run on the integer kernel: power-of-two scales, one normalised dim, one input zero
    point, per-channel input scales only along the normalised dim."""
    return (pot_uniform(in_qp, out_qp) and len(node.attrs["shape"]) == 1 and in_qp.zero_point.dim() == 0
            and (in_qp.scale.dim() == 0 or in_qp.axis in (-1, None)))


class LayerNormKernel:
    """Integer LayerNorm of one node; constants are built once from its float affine."""

    def __init__(self, node, in_qp, out_qp):
        channels = int(node.attrs["shape"][0])
        scale = in_qp.scale.double().reshape(-1)
        base = float(scale.min())
        # PTF: per-channel scales base·2^c_j enter as left shifts c_j
        self.shift = pot_exponent(scale / base, "round") if scale.numel() > 1 else torch.zeros((), dtype=torch.int64)
        gamma = node.params.get("weight", torch.ones(channels))
        beta = node.params.get("bias", torch.zeros(channels))
        self.gamma_q, self.beta_q, self.eps_q, self.out_shift = arith.layernorm_constants(
            gamma, beta, node.attrs["eps"], base, channels, float(out_qp.scale), frac_bits=FRAC_BITS)
        self.in_zp = int(in_qp.zero_point)
        self.out_qp = out_qp
        # a fractional square root keeps rows with a small spread accurate (room for it up to 8-bit codes)
        self.sqrt_frac_bits = 8 if in_qp.bits <= 8 else 0

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        o = self.out_qp
        return arith.int_layernorm(q, self.in_zp, self.shift, self.gamma_q, self.beta_q, self.eps_q, FRAC_BITS,
                                   self.out_shift, int(o.zero_point), o.qmin, o.qmax, sqrt_frac_bits=self.sqrt_frac_bits)


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
        raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales")
    k = LayerNormKernel(node, in_qp, qp)
    ctx.fill(op, "layer_norm", node.inputs[:1], {"dim": -1}, {
        "in_zero_point": np_small(k.in_zp), "ptf_shift": np_small(k.shift), "gamma_q": np_int(k.gamma_q),
        "beta_q": np_int(k.beta_q), "eps_q": np_int(k.eps_q), "frac_bits": np_small(FRAC_BITS),
        "sqrt_frac_bits": np_small(k.sqrt_frac_bits), "out_shift": np_small(k.out_shift),
        "out_zero_point": np_small(qp.zero_point), "out_qmin": np_small(qp.qmin), "out_qmax": np_small(qp.qmax)})
    return Value(qp.scale.double(), zero())


def _run(op, c, state, vals, accs):
    codes = arith.int_layernorm(
        vals[op.inputs[0]], int(c["in_zero_point"]), c["ptf_shift"], c["gamma_q"], c["beta_q"], int(c["eps_q"]),
        int(c["frac_bits"]), int(c["out_shift"]), int(c["out_zero_point"]), int(c["out_qmin"]), int(c["out_qmax"]),
        sqrt_frac_bits=int(c["sqrt_frac_bits"]))
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
            f"{em.array('ptf_shift')}, {ptf.size}, {em.scalar('frac_bits')}, {em.scalar('sqrt_frac_bits')}, "
            f"INT64_C({em.scalar('eps_q')}), {em.array('gamma_q')}, {em.array('beta_q', wide=True)}, "
            f"{em.scalar('out_shift')}, {em.scalar('out_zero_point')}, {em.scalar('out_qmin')}, "
            f"{em.scalar('out_qmax')}, {em.scalar('requant.zero_point')}, {em.acc()});"]


def _widths(op, bounds, done, program):
    g = {k: np.asarray(v).astype(np.int64) for k, v in op.arrays.items()}
    c = program[op.inputs[0]].out_shape[-1]
    frac, p = int(g["frac_bits"]), int(g["sqrt_frac_bits"])
    x = bounds[op.inputs[0]] << int(g["ptf_shift"].max())
    var = c * c * x * x + abs(int(g["eps_q"]))
    y = 2 * c * x
    # |y_j| / sqrt(V) is a normalised value (at most sqrt(C - 1)); the floored root r can be smaller than sqrt(V),
    # so the quotient is bounded as arith.int_layernorm's guard bounds it
    nrm = (2 * math.isqrt(c) + 3) << frac
    root = math.isqrt(var << (2 * p)) + 1
    return {"shifted": x, "sum": c * x, "sum_squares": c * x * x, "variance": var, "variance_shifted": var << (2 * p),
            "centred": y, "numerator": 2 * (y << (frac + p)) + root, "normalised": nrm,
            "affine": nrm * absmax(g["gamma_q"]) + absmax(g["beta_q"]),
            "acc": abs(int(g["out_qmax"])) + abs(int(g["out_qmin"])) + abs(int(g["requant.zero_point"]))}


register(
    OpDef("layer_norm", _float, lower=_lower, simulate=_simulate, onnx=_onnx, channel_axis=-1, norm="channels"),
    ProgramKind("layer_norm", "over the last dim (C channels): x_j = (x_j - in_zero_point) << ptf_shift_j; "
                              "S1 = sum x; S2 = sum x^2; y_j = C x_j - S1; V = C S2 - S1^2 + eps_q; "
                              "r = max(1, isqrt(V << 2 sqrt_frac_bits)) (floor square root); "
                              "n_j = ((y_j << (frac_bits + sqrt_frac_bits + 1)) + r) // (2 r) (division rounded half "
                              "up); codes = clamp(srr(n_j gamma_q_j + beta_q_j, out_shift) + out_zero_point, out_qmin, "
                              "out_qmax); then the identity requant (arith.int_layernorm)",
                run=_run, category="layernorm_constants", c=_c, widths=_widths),
)

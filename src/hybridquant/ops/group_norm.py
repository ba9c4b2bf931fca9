"""GroupNorm: an integer kernel in 32 bits, LayerNorm's arithmetic over rows of one channel group and every
position (MobileViT-v2's one-group form: the whole ``[C, H, W]`` of an image), with the affine per channel."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..primitives import arith, dequantize, quantize
from .layer_norm import row_counts, row_widths
from .norms import channel_affine
from .registry import OpDef, ProgramKind, register
from .values import Value, elements, np_int, np_small, pot_uniform, zero


def _row(node, shape) -> int:
    """Values each row normalises together: a group of channels at every position."""
    return math.prod(shape[1:]) // int(node.attrs["groups"])


def _in_bound(in_qp) -> int:
    zp = int(in_qp.zero_point)
    return max(in_qp.qmax - zp, zp - in_qp.qmin)


def supported(node, in_qp, out_qp, shape) -> bool:
    """Whether ``node`` (input of ``shape``) can run on the integer kernel: power-of-two per-tensor scales and
    zero points, and rows that fit the int32 kernel with their squares rounded down
    (:func:`~hybridquant.primitives.arith.groupnorm_shifts`)."""
    if not (pot_uniform(in_qp, out_qp) and in_qp.scale.dim() == 0 and in_qp.zero_point.dim() == 0
            and out_qp.zero_point.dim() == 0):
        return False
    try:
        arith.groupnorm_shifts(_row(node, shape), _in_bound(in_qp))
    except ValueError:
        return False
    return True


def _why(node, shape) -> str:
    return (f"cannot lower {node.name}: group_norm needs power-of-two per-tensor input and output scales and rows "
            f"that fit int32 ({_row(node, shape)} values per row)")


class GroupNormKernel:
    """Integer GroupNorm of one node (input ``shape``); constants are built once from its float affine."""

    def __init__(self, node, in_qp, out_qp, shape):
        channels, count = int(shape[1]), _row(node, shape)
        # a common shift up where the int32 row has room (precision of the variance); squares rounded down where
        # it has none
        self.shift, self.square_shift = arith.groupnorm_shifts(count, _in_bound(in_qp))
        gamma = node.params.get("weight", torch.ones(channels))
        beta = node.params.get("bias", torch.zeros(channels))
        self.const = arith.layernorm_constants(gamma, beta, node.attrs["eps"], float(in_qp.scale) / 2**self.shift,
                                               channels, float(out_qp.scale), out_qp.qmin, out_qp.qmax,
                                               out_qp.zero_point, count=count)
        self.groups, self.in_zp, self.out_qp = int(node.attrs["groups"]), int(in_qp.zero_point), out_qp

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        o, k = self.out_qp, self.const
        return arith.int_groupnorm(q, self.groups, self.in_zp, self.shift, k["gamma_q"], k["beta_q"], k["eps_q"],
                                   k["out_shift"], int(o.zero_point), o.qmin, o.qmax, self.square_shift)


def _simulate(node, in_qp, out_qp):
    state: dict[tuple, GroupNormKernel | None] = {}  # the kernel of each input shape (its rows depend on it)

    def kernel(shape):
        key = tuple(shape[1:])
        if key not in state:
            state[key] = GroupNormKernel(node, in_qp, out_qp, shape) if supported(node, in_qp, out_qp, shape) else None
        return state[key]

    def run(inputs):
        k = kernel(inputs[0].shape)
        if k is None:
            return _float(node, inputs)
        q = quantize(inputs[0], in_qp.scale, in_qp.zero_point, in_qp.qmin, in_qp.qmax).to(torch.int64)
        return dequantize(k(q), out_qp.scale, out_qp.zero_point)
    if not pot_uniform(in_qp, out_qp):
        return None
    return run


def _lower(ctx, node, op):
    qp, in_qp, shape = ctx.qg.act[node.name], ctx.qg.input_qparams(node), ctx.shapes[node.inputs[0]]
    if not supported(node, in_qp, qp, shape):
        raise HybridQuantError(_why(node, shape))
    k = GroupNormKernel(node, in_qp, qp, shape)
    ctx.fill(op, "group_norm", node.inputs[:1], {"groups": k.groups}, {
        "in_zero_point": np_small(k.in_zp), "in_shift": np_small(k.shift), "square_shift": np_small(k.square_shift),
        "gamma_q": np_small(k.const["gamma_q"]),
        "beta_q": np_int(k.const["beta_q"]), "eps_q": np_int(k.const["eps_q"]), "out_shift": np_small(k.const["out_shift"]),
        "out_zero_point": np_small(qp.zero_point), "out_qmin": np_small(qp.qmin), "out_qmax": np_small(qp.qmax)})
    return Value(qp.scale.double(), zero())


def _run(op, c, state, vals, accs):
    codes = arith.int_groupnorm(
        vals[op.inputs[0]], int(op.attrs["groups"]), int(c["in_zero_point"]), int(c["in_shift"]), c["gamma_q"],
        c["beta_q"], int(c["eps_q"]), int(c["out_shift"]), int(c["out_zero_point"]), int(c["out_qmin"]),
        int(c["out_qmax"]), int(c["square_shift"]))
    return codes - c["requant.zero_point"]


def _float(node, inputs):
    p = node.params
    return F.group_norm(inputs[0], node.attrs["groups"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def _onnx(ex, node, xs):
    return ex.b.add("GroupNormalization", channel_affine(ex, node, xs), node.name, num_groups=int(node.attrs["groups"]),
                    epsilon=float(node.attrs["eps"]))


def _c(op, em):
    x = op.inputs[0]
    shape = em.shape(x)
    return [f"hq_group_norm({em.codes(x)}, {shape[0]}, {int(op.attrs['groups'])}, {shape[1]}, "
            f"{elements(shape[2:])}, {em.scalar('in_zero_point')}, {em.scalar('in_shift')}, "
            f"{em.scalar('square_shift')}, {em.scalar('eps_q')}, "
            f"{em.array('gamma_q')}, {em.array('beta_q')}, {em.scalar('out_shift')}, {em.scalar('out_zero_point')}, "
            f"{em.scalar('out_qmin')}, {em.scalar('out_qmax')}, {em.scalar('requant.zero_point')}, {em.acc()});"]


def _count(op, program) -> int:
    return _row(op, program[op.inputs[0]].out_shape)


register(
    OpDef("group_norm", _float, lower=_lower, simulate=_simulate, onnx=_onnx, channel_axis=1, norm="groups",
          kernel_output=True),
    ProgramKind("group_norm", "over each group of C / groups channels at every position (a row of L values), "
                              "int32 throughout: x = (x - in_zero_point) << in_shift, then the layer_norm kernel's n "
                              "over each row with L in place of C, each square and rem^2 // L and eps_q rounded by "
                              "srr(., square_shift) before the sum and the reciprocal 2^(30 - square_shift / 2) // r "
                              "(for L > 46340: the fraction ((rem >> t) R + (L >> t) // 2) // (L >> t) with t the "
                              "least shift of L to 46340 or less, no rem^2 term, and n = srr(d R - k, 15 - E - p), "
                              "E = max(0, floor(log2 L) // 2 - 4); arith._normalise_rows); codes = clamp(srr(n gamma_q[c] + beta_q[c], "
                              "out_shift) + out_zero_point, out_qmin, out_qmax) for channel c; then the identity "
                              "requant (arith.int_groupnorm)",
                run=_run, category="layernorm_constants", c=_c,
                widths=lambda op, bounds, done, program: row_widths(
                    op, bounds[op.inputs[0]] << int(np.asarray(op.arrays["in_shift"])), _count(op, program),
                    int(np.asarray(op.arrays["square_shift"]))),
                counts=lambda op, program: row_counts(_count(op, program),
                                                      elements(op.out_shape) // _count(op, program))),
)

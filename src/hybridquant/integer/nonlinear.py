"""Integer softmax and LayerNorm on quantized tensors, shared by the simulation and the executor.

The simulation (:class:`~hybridquant.graph.quantized.QuantizedGraph` with
power-of-two scales) runs these exact integer kernels for softmax and
LayerNorm, so the integer program matches it bit for bit; every other op is
exact in float arithmetic on the integer grid anyway.
"""

from __future__ import annotations

import torch

from ..graph.ir import Node
from ..primitives import pot_exponent
from ..qparams import QParams
from . import arith

FRAC_BITS = 16


def supported(node: Node, in_qp: QParams | None, out_qp: QParams | None) -> bool:
    """Whether ``node`` (softmax / layer_norm) can run on the integer kernels."""
    if in_qp is None or out_qp is None or in_qp.kind != "uniform" or out_qp.kind != "uniform":
        return False
    if not (in_qp.is_pot and out_qp.is_pot) or out_qp.scale.dim() != 0:
        return False
    if node.op == "softmax":
        return in_qp.scale.dim() == 0 and int(out_qp.zero_point) == 0 and out_qp.qmin == 0
    if node.op == "layer_norm":
        return len(node.attrs["shape"]) == 1 and in_qp.zero_point.dim() == 0 and (
            in_qp.scale.dim() == 0 or in_qp.axis in (-1, None))
    return False


def softmax_out_exp(out_qp: QParams) -> int:
    """``m`` with the softmax output scale ``2^-m``."""
    return -int(pot_exponent(out_qp.scale, "exact"))


def softmax_codes(q: torch.Tensor, node: Node, in_qp: QParams, out_qp: QParams) -> torch.Tensor:
    """Output codes of the integer softmax (scale 2^-m, zero point 0)."""
    return arith.int_softmax(q, int(in_qp.zero_point), float(in_qp.scale), softmax_out_exp(out_qp), out_qp.qmax,
                             dim=node.attrs["dim"], frac_bits=FRAC_BITS)


class LayerNormKernel:
    """Integer LayerNorm of one node; constants are built once from its float affine."""

    def __init__(self, node: Node, in_qp: QParams, out_qp: QParams):
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

"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterisation of post-LayerNorm and post-softmax activations.

**Post-LayerNorm activations.** Their ranges differ wildly between channels,
so they are calibrated with per-channel asymmetric min-max quantizers
(step ``s_j``, zero point ``z_j``, over every calibration value of channel
j) and then reparameterised into one per-tensor quantizer with step
``s̃ = mean_j s_j`` and zero point ``z̃ = round(mean_j z_j)``:

* ``r1_j = s_j / s̃`` and ``r2_j = z_j − z̃``;
* the LayerNorm output channel j becomes ``(X_j + s_j·r2_j) / r1_j``, i.e.
  ``β_j ← (β_j + s_j·r2_j) / r1_j`` and ``γ_j ← γ_j / r1_j``;
* the next linear layer undoes it: ``W[:, j] ← W[:, j]·r1_j`` and
  ``b ← b − W·(s ⊙ r2)`` (with the original ``W``).

The float model is unchanged, and quantizing the new tensor per tensor with
(``s̃``, ``z̃``) gives exactly the codes the per-channel quantizer gave the
old one. The shift is folded here; the scaling ``γ/r1, β/r1, W·r1`` by
:func:`~.scaling.apply_input_scaling`. With ``scales='pot'``, ``s̃`` is
``2^round(log2 mean_j s_j)`` and ``r1_j = 2^round(log2(s_j / s̃))``: channel j
is then calibrated with step ``s̃·r1_j`` (the zero points follow from the
channel minima), so dividing by ``r1`` stays a shift; the engine then
re-derives the per-tensor zero point from the observed minimum of the
reparameterised tensor, which is ``z̃`` up to rounding at the range ends.
``r1`` is clamped to [2^-16, 2^16] (a near-constant channel), the channel
step being ``s̃·r1_j`` in every case. Reparameterised are the LayerNorms
with an affine whose only reader is a linear layer reading them directly
(MobileViT: every transformer ``norm1`` → qkv and ``norm2`` → fc1); the
others (MobileViT's final transformer norm, read through reshapes by a
conv) get per-tensor min-max. The post-LayerNorm quantizers use
``config.abits`` and ignore ``act_symmetry`` (RepQ-ViT's are asymmetric).

**Post-softmax activations** use the log√2 quantizer (QParams
``grid='log_sqrt2'``, values ``2^(-q/2)``, the top code standing for zero;
:func:`~hybridquant.primitives.log_sqrt2_fake_quantize`) with ``abits``
bits. RepQ-ViT reparameterises it for inference into a log2 form:
``2^(-q/2) = 2^-⌈q/2⌉ · (1 + (q mod 2)·(√2 − 1))``, so ``attn·V`` is a sum of
shifted ``V`` codes plus (√2 − 1) times a second such sum over the odd
codes, the constant going into the requantization.

Everything else (other activations; weights per output channel) is min-max.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import QuantConfig, RepQViTConfig
from ..graph.ir import Graph, Node
from ..observers import ActivationObserver
from ..primitives import pot_scale, qrange, round_half_up
from ..qparams import QParams
from ..store import Workspace
from .base import Method
from .scaling import apply_input_scaling

#: bounds of the reparameterisation factors r1
R_MIN, R_MAX = 2.0**-16, 2.0**16


def log_sqrt2_softmax_qparams(bits: int) -> QParams:
    """RepQ-ViT's log√2 quantizer for softmax outputs: values 2^(-q/2), q in [0, 2^bits − 1) (top code: 0)."""
    return QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), 0, (1 << bits) - 1, bits, None,
                   "log_sqrt2")


def reparam_targets(graph: Graph) -> list[tuple[Node, Node]]:
    """(LayerNorm, linear) pairs: an affine LayerNorm read only, and directly, by one linear layer."""
    pairs = []
    for ln in graph.where(norm="channels"):
        users = graph.users(ln.name)
        if ("weight" in ln.params and len(users) == 1 and users[0].opdef.weighted
                and users[0].opdef.channel_axis == ln.opdef.channel_axis and users[0].inputs[0] == ln.name):
            pairs.append((ln, users[0]))
    return pairs


@torch.no_grad()
def channel_ranges(graph: Graph, names: list[str], calib: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) along the last dim of the named outputs over ``calib``."""
    wanted = set(names)
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        if node.name in wanted:
            flat = out.detach().float().reshape(-1, out.shape[-1])
            a, b = flat.amin(0), flat.amax(0)
            lo[node.name] = a if node.name not in lo else torch.minimum(lo[node.name], a)
            hi[node.name] = b if node.name not in hi else torch.maximum(hi[node.name], b)
        return out

    for x in calib:
        graph.run(x, hook=hook)
    return {n: (lo[n], hi[n]) for n in names}


def reparam_factors(ch_min: torch.Tensor, ch_max: torch.Tensor, bits: int, pot: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """RepQ-ViT's ``r1``, the per-channel shift ``s ⊙ r2`` and the per-tensor quantizer (s̃, z̃).

    Per-channel asymmetric min-max steps ``s_j`` over [min(lo_j, 0), max(hi_j, 0)].
    """
    qmin, qmax = qrange(bits, signed=False)
    lo = ch_min.double().clamp(max=0.0)
    hi = ch_max.double().clamp(min=0.0)
    s = (hi - lo).clamp_min(1e-8) / (qmax - qmin)
    s_t = s.mean()
    if pot:
        s_t = pot_scale(s_t, "round")
        r1 = pot_scale(s / s_t, "round")
    else:
        r1 = s / s_t
    r1 = r1.clamp(R_MIN, R_MAX)
    step = s_t * r1  # the per-channel step the reparameterisation reproduces
    z = torch.clamp(round_half_up(-lo / step), qmin, qmax)
    z_t = round_half_up(z.mean())
    shift = step * (z - z_t)
    qp = QParams(s_t.float(), z_t.to(torch.int32), qmin, qmax, bits)
    return r1.float(), shift.float(), qp


def reparameterise(graph: Graph, ln: Node, linear: Node, r1: torch.Tensor, shift: torch.Tensor) -> str:
    """Fold ``X_j → (X_j + shift_j) / r1_j`` into ``ln``'s affine and its inverse into ``linear``."""
    w = linear.params["weight"]
    bias = linear.params.get("bias", torch.zeros(w.shape[0], dtype=w.dtype))
    linear.params["bias"] = (bias.double() - w.double() @ shift.double()).to(w.dtype)
    ln.params["bias"] = ln.params.get("bias", torch.zeros_like(shift)) + shift
    return apply_input_scaling(graph, linear, r1)


class RepQViT(Method):
    """Reparameterised per-channel post-LayerNorm quantizers, log√2 softmax, min-max elsewhere."""

    name = "repq-vit"
    config_class = RepQViTConfig

    def __init__(self, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        self.reparam: dict[str, QParams] = {}  # LayerNorm name -> its per-tensor quantizer (s̃, z̃)

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        pairs = reparam_targets(graph)
        ranges = channel_ranges(graph, [ln.name for ln, _ in pairs], calib)
        self.reparam = {}
        r_spread = {}
        for ln, linear in pairs:
            r1, shift, qp = reparam_factors(*ranges[ln.name], config.abits, config.pot)
            how = reparameterise(graph, ln, linear, r1, shift)
            assert how == "folded", f"{ln.name}: the reparameterisation must fold into the LayerNorm"
            self.reparam[ln.name] = qp
            r_spread[ln.name] = {"r1_min": float(r1.min()), "r1_max": float(r1.max())}
        return {"reparameterised": sorted(self.reparam), "per_layer": r_spread,
                "log_sqrt2_softmax": len(graph.where(unit_interval=True))}

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if node.opdef.unit_interval:  # attention probabilities
            return log_sqrt2_softmax_qparams(bits)
        qp = self.reparam.get(node.name)
        if qp is not None and qp.bits == bits:
            return QParams(qp.scale.clone(), qp.zero_point.clone(), qp.qmin, qp.qmax, qp.bits)
        return super().act_qparams(node, obs, bits, config)

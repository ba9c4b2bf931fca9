"""HyQ (Kim & Kim, IJCAI 2024): quantization-aware distribution scaling (QADS).

For the 1×1 expansion conv (``conv1_1x1``) and the 1×1 projection conv
(``conv3_1x1``) of every MobileNetV2 bottleneck block (``block == 'mv2'``) a
per-input-channel ``α`` is learned so that the quantized layer
``conv(Q_a(X/α), Q_w(W·α))`` matches the float one ``conv(X, W)`` in MSE:

* ``X`` are the float input activations of the layer on the calibration
  images, cached once (a 1×1 conv is a linear map over channels, so a
  ``[pixels, C]`` matrix of randomly chosen pixels of at most
  ``MAX_IMAGES`` images stands in for them; the per-channel min/max are
  taken over every pixel);
* ``Q_a`` is per-tensor asymmetric ``abits``-bit fake-quant whose range is
  the min/max of ``X/α`` (per-channel extremes divided by α, so it is exact
  over all calibration pixels), ``Q_w`` per-output-channel symmetric
  ``wbits``-bit fake-quant of ``W·α``; rounding uses the straight-through
  estimator, so gradients reach α through the division, the product and
  both scales;
* ``α = exp(θ)`` with θ initialised to 0, Adam for ``HyQConfig.iters``
  iterations with learning rate ``HyQConfig.lr`` (0.01 when unset) and a
  cosine schedule, on random mini-batches of at most ``BATCH_PIXELS`` pixels.

α is applied as an explicit per-channel layer (``X/α``, HyQ's parameter
increase) and folded into the weights (``W·α``). With ``scales='pot'`` the
learned α is rounded to ``2^round(log2 α)`` — HyQ with naive power-of-two
rounding. HyQ also pins the lower bound of every depthwise conv's input
quantizer to the SiLU minimum −0.2785 when that input is a SiLU output (generally: the minimum of a
non-linearity with a negative tail, its ``OpDef.output_min``).
Everything else is min-max.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import HyQConfig, QuantConfig
from ..graph.ir import Graph, Node
from ..observers import ActivationObserver
from ..primitives import pot_scale, qrange, round_half_up
from ..qparams import QParams, choose_mode, range_to_qparams
from ..store import Workspace
from .base import Method
from .scaling import apply_input_scaling

#: QADS layers: module paths of an MV2 block's 1x1 expansion and projection convs
QADS_SUFFIXES = ("conv1_1x1.conv", "conv3_1x1.conv")
#: calibration images whose pixels are cached per layer
MAX_IMAGES = 128
#: pixels cached per layer (spread over the images)
MAX_PIXELS = 16384
#: pixels per Adam iteration
BATCH_PIXELS = 2048
DEFAULT_LR = 0.01


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (round_half_up(x) - x).detach()


def qads_quant_output(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, ch_min: torch.Tensor,
                      ch_max: torch.Tensor, abits: int, wbits: int) -> torch.Tensor:
    """``Q_a(X/α) @ Q_w(W·α)ᵀ`` for pixels ``x`` [N, C] and a 1x1 weight [O, C] (differentiable in α)."""
    alpha = log_alpha.exp()
    # per-tensor asymmetric activation quantizer over the range of X/α (α > 0: extremes scale per channel)
    lo = (ch_min / alpha).min().clamp(max=0.0)
    hi = (ch_max / alpha).max().clamp(min=0.0)
    aq_min, aq_max = qrange(abits, signed=False)
    s_a = (hi - lo).clamp_min(1e-8) / (aq_max - aq_min)
    z_a = _round_ste(-lo / s_a).clamp(aq_min, aq_max)
    # integer codes minus the zero point; the scale s_a is applied after the matmul
    codes = torch.clamp(_round_ste(x * (1.0 / (alpha * s_a))) + z_a, aq_min, aq_max) - z_a
    # per-output-channel symmetric (narrow) weight quantizer of W·α
    wa = weight * alpha
    _, wq_max = qrange(wbits, signed=True, narrow=True)
    s_w = (wa.abs().amax(1, keepdim=True) / wq_max).clamp_min(1e-8)
    wq = torch.clamp(_round_ste(wa / s_w), -wq_max, wq_max) * s_w
    return (codes @ wq.t()) * s_a


def qads_loss(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, ch_min: torch.Tensor,
              ch_max: torch.Tensor, abits: int, wbits: int) -> float:
    """QADS objective ``MSE(conv(X, W), conv(Q_a(X/α), Q_w(W·α)))`` of a given α (no bias: it cancels)."""
    with torch.no_grad():
        weight = weight.reshape(weight.shape[0], -1).float()
        ref = x @ weight.t()
        out = qads_quant_output(x, weight, alpha.double().log().float(), ch_min, ch_max, abits, wbits)
        return float((out - ref).pow(2).mean())


def learn_alpha(x: torch.Tensor, weight: torch.Tensor, ch_min: torch.Tensor, ch_max: torch.Tensor, abits: int,
                wbits: int, iters: int, lr: float, batch: int = BATCH_PIXELS, seed: int = 0) -> torch.Tensor:
    """Learn QADS's per-input-channel α for pixels ``x`` [N, C] and a 1x1 conv weight [O, C, 1, 1] or [O, C].

    ``ch_min`` / ``ch_max`` are the per-channel extremes of the layer input
    over all calibration data (they set the activation range). Mini-batches
    of ``batch`` pixels walk through a fresh random permutation of ``x``
    each epoch.
    """
    x = x.detach().float().clone()
    weight = weight.detach().float().reshape(weight.shape[0], -1).clone()
    ch_min, ch_max = ch_min.detach().float().clone(), ch_max.detach().float().clone()
    log_alpha = torch.zeros(x.shape[1], requires_grad=True)
    if iters <= 0:
        return log_alpha.detach().exp()
    ref_all = x @ weight.t()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    n = x.shape[0]
    batch = min(batch, n)
    pos = n  # start a new epoch at once
    with torch.enable_grad():
        for _ in range(iters):
            if pos + batch > n:
                perm = torch.randperm(n, generator=gen)
                xs, refs, pos = x[perm], ref_all[perm], 0
            xb, ref = xs[pos:pos + batch], refs[pos:pos + batch]
            pos += batch
            out = qads_quant_output(xb, weight, log_alpha, ch_min, ch_max, abits, wbits)
            loss = (out - ref).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return log_alpha.detach().exp()


def qads_targets(graph: Graph) -> list[Node]:
    """The 1x1 expansion / projection convs of every MV2 block (dense, unpadded)."""
    out = []
    for n in graph.where(weighted=True, channel_axis=1):  # the spatial (NCHW) layers
        path = n.module or n.name
        if n.block == "mv2" and path.endswith(QADS_SUFFIXES) and n.opdef.pointwise(n):
            out.append(n)
    return out


def depthwise_silu_inputs(graph: Graph) -> dict[str, float]:
    """The SiLU-like nodes (a negative tail: ``output_min``) whose output feeds a depthwise conv (one weight row
    per channel), with that minimum."""
    names = {}
    for n in graph.where(weighted=True):
        if n.opdef.weight_layout(n) == "depthwise" and n.params["weight"].shape[0] == n.attrs["groups"]:
            prod = graph.producer(n.inputs[0])
            if prod.opdef.output_min is not None:
                names[prod.name] = prod.opdef.output_min
    return names


@torch.no_grad()
def cache_inputs(graph: Graph, layers: list[Node], calib: list[torch.Tensor], seed: int = 0
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: (pixels [N, C] of its float input, per-channel min, per-channel max).

    Pixels come from at most ``MAX_IMAGES`` images, at most ``MAX_PIXELS`` in
    all; the extremes are over every pixel of every calibration image.
    """
    wanted = {n.inputs[0] for n in layers}
    n_images = min(MAX_IMAGES, sum(x.shape[0] for x in calib))
    per_image = max(1, math.ceil(MAX_PIXELS / max(n_images, 1)))
    gen = torch.Generator().manual_seed(seed)
    pixels: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    ch_min: dict[str, torch.Tensor] = {}
    ch_max: dict[str, torch.Tensor] = {}
    seen = 0

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        if node.name in wanted:
            t = out.detach().float()
            lo, hi = t.amin(dim=(0, 2, 3)), t.amax(dim=(0, 2, 3))
            ch_min[node.name] = lo if node.name not in ch_min else torch.minimum(ch_min[node.name], lo)
            ch_max[node.name] = hi if node.name not in ch_max else torch.maximum(ch_max[node.name], hi)
            take = min(t.shape[0], n_images - seen)
            if take > 0:
                rows = t[:take].flatten(2).transpose(1, 2)  # [B, HW, C]
                hw = rows.shape[1]
                if hw > per_image:
                    idx = torch.rand(take, hw, generator=gen).argsort(1)[:, :per_image]
                    rows = rows.gather(1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[2]))
                pixels[node.name].append(rows.reshape(-1, rows.shape[2]).clone())
        return out

    for x in calib:
        graph.run(x, hook=hook)
        seen += x.shape[0]
    return {n.name: (torch.cat(pixels[n.inputs[0]]), ch_min[n.inputs[0]], ch_max[n.inputs[0]]) for n in layers}


class HyQ(Method):
    """QADS on MV2 1x1 convs, SiLU-pinned depthwise inputs, min-max elsewhere."""

    name = "hyq"
    config_class = HyQConfig

    def __init__(self, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        self.pinned: dict[str, float] = {}

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        self.pinned = depthwise_silu_inputs(graph)
        layers = qads_targets(graph)
        info: dict[str, Any] = {"layers": len(layers), "iters": config.options.iters, "pinned_silu": len(self.pinned)}
        if not layers or config.options.iters <= 0:
            return info
        lr = config.options.lr if config.options.lr is not None else DEFAULT_LR
        cache = cache_inputs(graph, layers, calib)
        losses = {}
        for i, node in enumerate(layers):
            x, lo, hi = cache[node.name]
            w = node.params["weight"].reshape(node.params["weight"].shape[0], -1)
            alpha = learn_alpha(x, w, lo, hi, config.abits, config.wbits, config.options.iters, lr, seed=i)
            if config.pot:
                alpha = pot_scale(alpha, "round").float()
            before = qads_loss(x, w, torch.ones_like(alpha), lo, hi, config.abits, config.wbits)
            after = qads_loss(x, w, alpha, lo, hi, config.abits, config.wbits)
            losses[node.name] = {"mse_alpha1": before, "mse": after,
                                 "alpha_min": float(alpha.min()), "alpha_max": float(alpha.max())}
            apply_input_scaling(graph, node, alpha, allow_fold=False)
        info["lr"] = lr
        info["per_layer"] = losses
        return info

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if node.name in self.pinned:
            lo, hi = self.pinned[node.name], max(obs.max, 0.0)
            mode = choose_mode(lo, hi, config.act_symmetry)
            return range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits, mode)
        return super().act_qparams(node, obs, bits, config)

"""Outlier scaling: move activation outliers into the next layer's weights.

For a dense conv or linear whose input X has outlier channels, per-channel
factors α give X' = X/α and W' = W·α — the float output is unchanged. α is
chosen by the quantized output error of that layer,

    E(α) = ‖ layer(Q_a(X/α), Q_w(W·α)) − layer(X, W) ‖²,

with power-of-two quantizers Q_a, Q_w whatever the model's scales (:func:`layer_error`
itself follows ``config.scales``): a float-scale model then starts from the same
transformed graph as the power-of-two one, which its scale search can fall back to
(:mod:`hybridquant.methods.hfq`).

over two candidate families: *clip-to-threshold* (α_j = the smallest power of
two bringing channel j's max under τ, for τ = max/2^t) and *SmoothQuant-like*
(α_j ∝ max|X_j|^β / max|W_j|^(1−β)). With ``alpha_pot`` every α is a power of
two, so X/α is a shift. The winner is applied only when it beats α = 1 by a
margin; the scaling is folded into the producing layer where possible
(:mod:`hybridquant.methods.scaling`), else kept as an explicit per-channel
shift vector — the reported parameter increase.

With ``channel_shift``, a layer whose input is a norm's output first gets its
input channels centred (:func:`channel_shift`), when that lowers the same
error.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from tqdm import tqdm

from ... import heap
from ...config import QuantConfig
from ...graph.ir import Graph, Node
from ...graph.stream import FloatStream, split_images
from ...observers import weight_qparams
from ...ops import run_float
from ...phases import progress_enabled
from ...primitives import pot_scale
from ...qparams import QParams, choose_mode, range_to_qparams, restrict_pot
from ...store import Held, Mapped, Stored, Workspace, as_chunks
from ..scaling import (
    apply_input_scaling,
    apply_input_shift,
    is_depthwise,
    scaling_targets,
    shift_source,
    weight_scale_shape,
)

MIN_GAIN = 0.05  # apply only when the output error falls by at least 5 %
THRESHOLD_STEPS = range(0, 7)
SMOOTH_BETAS = (0.25, 0.5, 0.75)

Chunks = Stored | Mapped | Held  # a value over the α-search images, chunk by chunk


def _pot(x: torch.Tensor) -> torch.Tensor:
    return pot_scale(x, "round").to(x.dtype)


def _act_qparams(xs: Chunks, bits: int, pot: bool, symmetry: str) -> QParams:
    """Min-max qparams of the value ``xs`` (all its chunks); with ``pot`` the best of a few power-of-two
    exponents by tensor MSE over every chunk, as the engine's search would do."""
    lo, hi = float("inf"), float("-inf")
    for c in xs:  # one pass: a Mapped value is computed again on every pass
        c_lo, c_hi = torch.aminmax(c)
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
    qp = range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits, choose_mode(lo, hi, symmetry))
    if not pot:
        return qp
    base = restrict_pot(qp, "round", lo=torch.tensor(lo))
    cands = []
    for d in (-2, -1, 0, 1):
        cand = restrict_pot(qp, "round", lo=torch.tensor(lo))
        cand.scale = base.scale * 2.0**d
        if cand.qmin == 0 and int(cand.zero_point) != 0:
            cand.zero_point = torch.clamp(torch.floor(-torch.tensor(lo) / cand.scale + 0.5), cand.qmin, cand.qmax).to(torch.int32)
        cands.append(cand)
    errs = [torch.zeros(()) for _ in cands]
    count = 0
    for x in xs:
        for i, cand in enumerate(cands):
            errs[i] = errs[i] + cand.fake(x).sub_(x).pow_(2).sum()  # in place on fake's fresh tensor
        count += x.numel()
    best, best_err = cands[0], float("inf")
    for cand, err in zip(cands, errs, strict=True):
        if float(err / count) < best_err:
            best, best_err = cand, float(err / count)
    return best


def _quant_weight(w: torch.Tensor, bits: int, pot: bool) -> torch.Tensor:
    qp = weight_qparams(w, bits)
    if pot:
        qp = restrict_pot(qp, "round")
    return qp.fake(w.flatten(1)).reshape(w.shape)


def layer_output(node: Node, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``node``'s float op on ``x`` with weight ``w`` and no bias."""
    return run_float(node, [x], {"weight": w})


def _channel_view(x: torch.Tensor, node: Node) -> torch.Tensor:
    """[C, everything else] along ``node``'s input channel dim."""
    return x.transpose(0, node.opdef.channel_axis).flatten(1)


def _broadcast(v: torch.Tensor, x: torch.Tensor, node: Node) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[node.opdef.channel_axis] = -1
    return v.reshape(shape)


def _sum_sq(xs: Chunks) -> torch.Tensor:
    return sum((c.pow(2).sum() for c in xs), torch.zeros(()))


def layer_error(node: Node, x: Chunks | torch.Tensor, alpha: torch.Tensor, config: QuantConfig,
                ref: Chunks | torch.Tensor, norm: torch.Tensor | None = None) -> float:
    """Output error of ``node`` with input scaling ``alpha`` (bias excluded: it cancels), relative to
    ``norm`` (default ``‖ref‖²``); ``x`` and ``ref`` are the layer's input and float output (tensors, or
    the same chunks of images)."""
    x, ref = as_chunks(x), as_chunks(ref)
    scaled = Mapped(x, lambda t: t / _broadcast(alpha, t, node))
    aq = _act_qparams(scaled, config.abits, config.pot, config.act_symmetry)
    w = node.params["weight"]
    factor = alpha
    if is_depthwise(node) and w.shape[0] != alpha.numel():
        factor = alpha.repeat_interleave(w.shape[0] // alpha.numel())
    wq = _quant_weight(w * factor.reshape(weight_scale_shape(node)), config.wbits, config.pot)
    err = torch.zeros(())
    for b in range(len(x)):
        err = err + layer_output(node, aq.fake(scaled.chunk(b)), wq).sub_(ref.chunk(b)).pow_(2).sum()
    return float(err / (_sum_sq(ref) if norm is None else norm).clamp_min(1e-30))


def candidate_alphas(x_absmax: torch.Tensor, w_absmax: torch.Tensor, pot: bool) -> list[torch.Tensor]:
    """Clip-to-threshold and SmoothQuant-like per-channel factors (all ≥ 1 for the first family). A channel whose
    input is always 0 (a dead ReLU channel) keeps α = 1: any factor leaves its error unchanged, and a tiny one
    would shrink its weights until their bias no longer fits the accumulator."""
    m = x_absmax.clamp_min(1e-8)
    dead = x_absmax == 0
    cands = []
    for t in THRESHOLD_STEPS:
        tau = m.max() / 2.0**t
        alpha = torch.clamp(m / tau, min=1.0)
        cands.append(pot_scale(alpha, "ceil").to(alpha.dtype) if pot else alpha)
        # equalize: every channel's max moved next to tau (small channels amplified too)
        cands.append(_pot(m / tau) if pot else m / tau)
    for beta in SMOOTH_BETAS:
        s = m.pow(beta) / w_absmax.clamp_min(1e-8).pow(1 - beta)
        s = s / s.median()  # keep typical channels unscaled
        s = s.clamp(1e-4, 1e4)
        cands.append(_pot(s) if pot else s)
    return [torch.where(dead, torch.ones_like(a), a) for a in cands]


def channel_shift(graph: Graph, node: Node, xin: Chunks, config: QuantConfig,
                  probe: torch.Tensor) -> tuple[Mapped, str] | None:
    """Centre ``node``'s input channels into the norm before it when that lowers the quantized output error.

    A norm's bias (β) puts a per-channel offset on the input that the weight multiplies into a large
    constant, cancelled again by the layer's bias: the weight's quantization error then scales with the
    offset. Candidates z: the channel means and the channel range midpoints (OS+); the winner must beat
    z = 0 by :data:`MIN_GAIN` on the error relative to the unshifted output. Returns (shifted input, how).
    """
    source = shift_source(graph, node)
    if source is None:
        return None
    w = node.params["weight"]
    ref = Mapped(xin, lambda t: layer_output(node, t, w))
    norm = _sum_sq(ref)
    ones = torch.ones(xin.chunk(0).shape[node.opdef.channel_axis])
    base = layer_error(node, xin, ones, config, ref)
    total, count, hi, lo = None, 0, None, None
    for c in xin:
        per = _channel_view(c, node)
        total = per.sum(1) if total is None else total + per.sum(1)
        count += per.shape[1]
        hi = per.max(1).values if hi is None else torch.maximum(hi, per.max(1).values)
        lo = per.min(1).values if lo is None else torch.minimum(lo, per.min(1).values)
    assert total is not None and hi is not None and lo is not None
    best = None
    for how, z in (("mean", total / count), ("midpoint", (hi + lo) / 2)):
        xs = Mapped(xin, lambda t, z=z: t - _broadcast(z, t, node))
        err = layer_error(node, xs, ones, config, Mapped(xs, lambda t: layer_output(node, t, w)), norm)
        if err < (1 - MIN_GAIN) * base and (best is None or err < best[0]):
            best = (err, how, z, xs)
    if best is None:
        return None
    _, how, z, xs = best
    before = graph.run(probe, keep=True)[node.name]
    apply_input_shift(node, source, z)
    after = graph.run(probe, keep=True)[node.name]
    if not torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max())):
        apply_input_shift(node, source, -z)  # the norm's channels do not map onto the layer's: undo
        return None
    return xs, how


#: calibration images the α search looks at; 128 instead of 32 gave +1.1 dB logit SQNR on the bundled model
#: at W8A8-PoT (runs of 32/64/128/512 images, 2,000 test images); 512 gave nothing more
ALPHA_SEARCH_IMAGES = 128


@torch.no_grad()
def outlier_scaling(graph: Graph, calib: list[torch.Tensor], config: QuantConfig,
                    max_images: int = ALPHA_SEARCH_IMAGES, workspace: Workspace | None = None) -> dict[str, Any]:
    """Scale the inputs of layers whose quantized output error α reduces; edits ``graph``.

    The layers' inputs are the float model's before any change (a copy of the graph walked chunk by chunk,
    kept in ``workspace``, a default one when None)."""
    config = config.replace(scales="pot")  # α is chosen under power-of-two quantizers for float scales too
    ws = workspace if workspace is not None else Workspace()
    layers = scaling_targets(graph, depthwise=True)
    readers = Counter(n.inputs[0] for n in layers)
    chunks = split_images(graph, calib, ws, limit=max_images)
    probe = chunks[0][:8]  # images to check a channel shift on
    stream = FloatStream(graph.clone(), chunks, ws, hold=readers)
    applied: list[dict[str, Any]] = []
    shifted: list[dict[str, str]] = []
    explicit_params = 0
    try:
        for node in tqdm(layers, desc="outlier scaling", disable=not progress_enabled(), leave=False):
            xin: Chunks = stream.value(node.inputs[0])
            if config.options.channel_shift and (res := channel_shift(graph, node, xin, config, probe)) is not None:
                xin = res[0]
                shifted.append({"layer": node.name, "block": node.block, "shift": res[1]})
            w = node.params["weight"]
            ref = Stored(ws)
            for b, c in enumerate(xin):
                ref.append(layer_output(node, c, w), xin.images[b])
            amax = None
            for c in xin:
                m = _channel_view(c, node).abs().max(1).values
                amax = m if amax is None else torch.maximum(amax, m)
            assert amax is not None
            x_absmax = amax
            if is_depthwise(node):
                w_absmax = w.abs().flatten(1).max(1).values.reshape(x_absmax.numel(), -1).max(1).values
            else:
                w_absmax = w.abs().transpose(0, 1).flatten(1).max(1).values
            base = layer_error(node, xin, torch.ones_like(x_absmax), config, ref)
            best_err, best_alpha = base, None
            for alpha in candidate_alphas(x_absmax, w_absmax, config.options.alpha_pot):
                err = layer_error(node, xin, alpha, config, ref)
                if err < best_err:
                    best_err, best_alpha = err, alpha
            ref.free()
            readers[node.inputs[0]] -= 1
            if readers[node.inputs[0]] == 0:
                stream.release(node.inputs[0])
            heap.release()
            if best_alpha is None or best_err > (1 - MIN_GAIN) * base:
                continue
            how = apply_input_scaling(graph, node, best_alpha)
            if how == "explicit":
                explicit_params += best_alpha.numel()
            applied.append({
                "layer": node.name, "block": node.block, "how": how, "error_before": base, "error_after": best_err,
                "channels_scaled": int((best_alpha != 1).sum()), "alpha_max": float(best_alpha.max()),
            })
    finally:
        stream.close()
    return {"layers_scaled": len(applied), "explicit_alpha_params": explicit_params, "layers": applied,
            "layers_shifted": len(shifted), "shifts": shifted}

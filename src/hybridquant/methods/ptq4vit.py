"""PTQ4ViT (Yuan et al., ECCV 2022): twin uniform quantization and Hessian-guided scale search.

**Twin uniform quantization** (QParams ``grid='twin'``, fake-quant
:func:`~hybridquant.primitives.twin_fake_quantize`). A ``k``-bit code spends
one bit on choosing between two ranges of ``k − 1``-bit codes whose steps
are related by a power of two, ``Δ_coarse = Δ_fine · 2^m`` (``m ≥ 0``), so an
integer kernel aligns a coarse code to the fine grid with a left shift by
``m`` and then reads every code at ``Δ_fine``:

* post-softmax outputs: the coarse range covers [0, 1) with
  ``Δ_coarse = 2^-(k-1)``; the fine range [0, 2^(k-1)·Δ_fine) serves the many
  small attention weights. A value uses the fine range when its fine code
  does not saturate. ``m`` is chosen first by the quantization MSE on the
  calibration sample, then by the Hessian-guided search below (the
  power-of-two constraint leaves ``m`` as the only free choice);
* post-GELU / post-SiLU outputs of the transformer MLP: a ``gelu`` or
  ``silu`` node gets the twin quantizer only when its output has negative
  calibration values and *every* consumer of it (layout ops being
  transparent, see :func:`twin_act_nodes`) is a ``linear`` node — the MLP's
  hidden activation ``fc1 → act → fc2``, which is what PTQ4ViT's post-GELU
  twin targets (in MobileViT SiLU plays GELU's role there). The coarse
  range holds the positive values, ``Δ_coarse = α·max / (2^(k-1) − 1)``;
  the fine range holds the negative ones, with the largest ``m`` (smallest
  ``Δ_fine``) whose 2^(k-1) negative codes still reach the calibration
  minimum. Every other SiLU/GELU output (the conv trunk's, or one that
  never goes negative) keeps the engine's plain uniform quantizer: the
  twin spends one bit on the range choice, so against the asymmetric
  min-max quantizer, which keeps all 2^k codes for one range, the positive
  side gets a step about twice as coarse (half the resolution), which
  PTQ4ViT only accepts where the negative side matters (the MLP). The
  coarse step is never below the step that reaches the minimum (``m ≥ 0``):
  several of the bundled model's MLP SiLUs rarely fire (max 0.1 or even
  below zero, min −0.278), and a coarse step taken from the max alone
  vanished and dropped every negative value (0 dB SQNR on those tensors;
  W8A8 float top-1 79.07 % against FP32 85.13 % before that fix).

**Hessian-guided scale search** (in :meth:`PTQ4ViT.refine`). PTQ4ViT
measures a layer's quantization error by the change of the task loss,
approximated to second order with a diagonal Hessian of the loss with
respect to the layer output ``O`` taken as the squared gradient:
``D(Ô) = Σ (∂L/∂O)² ⊙ (Ô − O)²`` (summed over the calibration images). Here
``L`` is the cross-entropy of the float model's logits against its own
top-1 predictions (the KL divergence to its own soft outputs has zero
gradient at the float model, so hard self-labels are used). The gradients
come from one forward/backward pass of the float graph per group of layers
(see below); every layer's float inputs ``X``, float output ``O`` and
``(∂L/∂O)²`` are cached, and for every conv2d, linear and matmul:

* the weight step (per output channel, the engine's weight format) is
  searched over ``α · max|W_c| / qmax`` for ``α`` in ``ALPHAS``
  (20 values in [0.5, 1.2]); output channels are independent, so the
  per-channel argmin of the per-channel objective is the joint optimum;
* each activation quantizer the layer reads (the output quantizer of the
  value op producing that input, layout ops being transparent) is searched
  over ``α ·`` its min-max range (uniform, per tensor; zero points follow),
  over ``α`` for the post-GELU/SiLU twin's coarse step, over ``m ∈ 0..MAX_TWIN_SHIFT``
  for the post-softmax twin;
* weight and activation searches alternate for ``ROUNDS`` (3) rounds; a
  candidate replaces the current choice only when it lowers ``D``, so the
  result is never worse on ``D`` than the min-max start (``α = 1``).

As in PTQ4ViT the search of one layer runs on its *float* inputs
(calibrated independently of the other layers' quantization). A tensor has
a single output quantizer in this engine; when several MAC layers read it
(MobileViT's qkv output feeds both attention matmuls) it is searched once,
with the first of them in topological order, and is fixed for the later
ones. Activation quantizers that feed no MAC layer, the graph input's
quantizer and per-channel quantizers keep their min-max (or twin)
parameters; layers reading a per-channel quantizer are not searched.

With ``scales='pot'`` every candidate is restricted before it is scored
(uniform activations and weights as the engine restricts them —
``pot_rounding``, ``objective`` meaning ``round`` — and two-term weight
steps with ``shift_terms=2``); a twin quantizer's coarse step is a power of
two, hence its fine step too.

Simplifications, stated exactly: at most ``MAX_IMAGES`` (32, PTQ4ViT's
calibration size) images are used for the gradients and the search; the
gradient pass runs in chunks of ``GRAD_CHUNK`` images and is repeated once
per group of layers whose cached tensors fit ``CACHE_BUDGET`` float
elements (the float model is deterministic, so every pass gives the same
values); weights use one step per output channel (not PTQ4ViT's split of a
weight matrix into sub-blocks); the grid is ``ALPHAS`` rather than the
paper's 100 points; biases are taken in float during the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PTQ4ViTConfig, QuantConfig
from ..graph.ir import Graph, Node
from ..graph.quantized import QuantizedGraph
from ..observers import ActivationObserver, quant_mse
from ..ops import run_float
from ..primitives import pot_exponent, pot_scale, two_term_round
from ..qparams import QParams, choose_mode, range_to_qparams, restrict_pot, with_scale
from ..store import Workspace
from .base import Method

#: multiples of the min-max range / step tried by the search
ALPHAS: tuple[float, ...] = tuple(torch.linspace(0.5, 1.2, 20).tolist())
#: alternating weight / activation search rounds per layer
ROUNDS = 3
#: calibration images used for gradients and the search
MAX_IMAGES = 32
#: images per forward/backward pass
GRAD_CHUNK = 8
#: float elements (inputs, outputs, squared gradients) cached at once
CACHE_BUDGET = 2**27
#: largest power-of-two ratio m between a twin quantizer's coarse and fine steps
MAX_TWIN_SHIFT = 12
def _token_layer(node: Node) -> bool:
    """A weighted layer over the last (channel) dim: a linear, the MLP's fc2."""
    return node.opdef.weighted and node.opdef.channel_axis == -1


def twin_act_nodes(graph: Graph) -> set[str]:
    """The non-linearities with a negative tail (GELU, SiLU: ``OpDef.output_min``) eligible for the signed
    (negative fine / positive coarse) twin: every value consumer is a linear.

    That is the transformer MLP's hidden activation (fc1 → act → fc2);
    conv-trunk activations (read by convolutions or adds) are excluded.
    """
    eligible = set()
    for node in graph:
        users = [user for _, user, _ in graph.value_users(node.name)]
        if node.opdef.output_min is not None and users and all(_token_layer(u) for u in users):
            eligible.add(node.name)
    return eligible


def twin_softmax_qparams(bits: int, shift: int) -> QParams:
    """Post-softmax twin quantizer: coarse step 2^-(k-1) over [0, 1), fine step 2^-(k-1+shift)."""
    half = bits - 1
    fine = 2.0 ** -(half + shift)
    return QParams(torch.tensor(fine), torch.tensor(0, dtype=torch.int32), 0, (1 << half) - 1, bits, None,
                   "twin", int(shift))


def twin_signed_qparams(lo: float, hi: float, bits: int, alpha: float = 1.0, pot: str | None = None) -> QParams:
    """Post-GELU/SiLU twin quantizer for a range [lo < 0, hi].

    The coarse step covers ``α·hi`` with the 2^(k-1) − 1 positive codes
    (rounded to a power of two with ``pot`` = ``'round'`` / ``'ceil'``); the
    fine step is the smallest ``coarse / 2^m`` whose 2^(k-1) negative codes
    still reach ``lo``. Since m ≥ 0, the coarse step is at least the step
    that reaches ``lo`` — a mostly negative activation (``hi`` small or
    below zero: MLP neurons that rarely fire) would otherwise get a
    vanishing step and lose its negative values.
    """
    half = 1 << (bits - 1)
    neg = max(-lo, 1e-12)
    coarse = max(alpha * max(hi, 0.0) / (half - 1), neg / half, 1e-12)
    if pot is not None:
        coarse = float(pot_scale(coarse, pot))
    ratio = coarse * half / neg
    shift = min(max(int(pot_exponent(ratio, "floor")), 0), MAX_TWIN_SHIFT) if ratio > 0 else 0
    fine = torch.tensor(coarse, dtype=torch.float32) / float(2**shift)  # exact: a power-of-two division
    return QParams(fine, torch.tensor(0, dtype=torch.int32), -half, half - 1, bits, None, "twin", shift)


def best_softmax_shift(sample: torch.Tensor, bits: int) -> int:
    """The fine-range shift m whose twin quantizer has the least MSE on ``sample``."""
    errs = [float(quant_mse(sample, twin_softmax_qparams(bits, m))) for m in range(MAX_TWIN_SHIFT + 1)]
    return min(range(len(errs)), key=errs.__getitem__)


@dataclass
class LayerData:
    """Cached float tensors of one MAC layer over the search images."""

    node: Node
    inputs: list[torch.Tensor]  # the value read at each input index (after layout ops)
    sources: list[str | None]   # the quantizer (producer name) on each input; None: float
    ref: torch.Tensor           # float output O
    g2: torch.Tensor            # (dL/dO)^2

    def output(self, act: dict[str, QParams], wq: QParams | None) -> torch.Tensor:
        """The layer's output with its inputs quantized by ``act`` and its weight by ``wq``."""
        ins = [act[s].fake(x) if s is not None else x for x, s in zip(self.inputs, self.sources, strict=True)]
        params = dict(self.node.params)
        if wq is not None:
            params["weight"] = wq.fake(self.node.params["weight"])
        return run_float(self.node, ins, params)

    def objective(self, out: torch.Tensor) -> float:
        """PTQ4ViT's Hessian-guided distance ``Σ (dL/dO)² (Ô − O)²``."""
        return float((self.g2 * (out - self.ref).pow(2)).sum(dtype=torch.float64))

    def channel_objective(self, out: torch.Tensor) -> torch.Tensor:
        """The same distance per output channel."""
        d = self.g2 * (out - self.ref).pow(2)
        return d.transpose(0, self.node.opdef.channel_axis).flatten(1).sum(1, dtype=torch.float64)


def search_weight(layer: LayerData, act: dict[str, QParams], wq: QParams, candidates: list[torch.Tensor]) -> QParams:
    """Per-output-channel step with the least objective among ``wq`` and ``candidates`` (step tensors)."""
    best_scale = wq.scale.clone()
    best_err = layer.channel_objective(layer.output(act, wq))
    for scale in candidates:
        cand = with_scale(wq, scale)
        err = layer.channel_objective(layer.output(act, cand))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand.scale, best_scale)
    return with_scale(wq, best_scale)


def search_act(layer: LayerData, act: dict[str, QParams], name: str, wq: QParams | None,
               candidates: list[QParams]) -> QParams:
    """The quantizer for ``name`` (current or a candidate) with the least layer objective."""
    best = act[name]
    best_err = layer.objective(layer.output(act, wq))
    trial = dict(act)
    for cand in candidates:
        trial[name] = cand
        err = layer.objective(layer.output(trial, wq))
        if err < best_err:
            best, best_err = cand, err
    return best


def _dedupe(cands: list[QParams]) -> list[QParams]:
    seen, out = set(), []
    for c in cands:
        key = (tuple(c.scale.flatten().tolist()), tuple(c.zero_point.flatten().tolist()), c.twin_shift)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _dedupe_tensors(cands: list[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for c in cands:
        if not any(torch.equal(c, o) for o in out):
            out.append(c)
    return out


def collect_layers(graph: Graph, nodes: list[Node], sources: dict[str, list[str | None]], x: torch.Tensor,
                   chunk: int = GRAD_CHUNK) -> dict[str, LayerData]:
    """Float inputs, outputs and squared loss gradients of ``nodes`` over images ``x``.

    The loss is the cross-entropy of the float graph's logits against its
    own top-1 predictions, summed over the images.
    """
    in_names = {i for n in nodes for i in n.inputs}
    out_names = {n.name for n in nodes}
    ins: dict[str, list[torch.Tensor]] = {k: [] for k in in_names}
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in out_names}
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in out_names}
    held: dict[str, torch.Tensor] = {}  # this chunk's outputs, still in the autograd graph

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        if node.name in in_names:
            ins[node.name].append(out.detach().clone())
        if node.name in out_names:
            held[node.name] = out
        return out

    for xb in x.split(chunk):
        held.clear()
        with torch.enable_grad():
            xin = xb.detach().clone().requires_grad_(True)
            logits = graph.run(xin, hook=hook)
            logits = logits.reshape(logits.shape[0], -1)
            loss = F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")
            names = [k for k, t in held.items() if t.requires_grad]
            got = torch.autograd.grad(loss, [held[k] for k in names], allow_unused=True) if names else []
        g = dict(zip(names, got, strict=True))
        for k, t in held.items():
            outs[k].append(t.detach().clone())
            gk = g.get(k)
            grads[k].append(torch.zeros_like(t.detach()) if gk is None else gk.detach().pow(2))
    cat = {k: torch.cat(v) for k, v in ins.items()}
    return {
        n.name: LayerData(n, [cat[i] for i in n.inputs], sources[n.name], torch.cat(outs[n.name]),
                          torch.cat(grads[n.name]))
        for n in nodes
    }


@torch.no_grad()
def _group_by_budget(graph: Graph, nodes: list[Node], x: torch.Tensor, budget: int) -> list[list[Node]]:
    """Consecutive groups of ``nodes`` whose cached tensors over ``x`` fit ``budget`` elements."""
    probe = graph.run(x[:1], keep=True)
    n = x.shape[0]
    groups: list[list[Node]] = []
    size = 0
    for node in nodes:
        cost = n * (sum(probe[i].numel() for i in set(node.inputs)) + 2 * probe[node.name].numel())
        if not groups or size + cost > budget:
            groups.append([])
            size = 0
        groups[-1].append(node)
        size += cost
    return groups


class PTQ4ViT(Method):
    """Twin uniform quantizers (softmax, MLP GELU/SiLU) and Hessian-guided scale search."""

    name = "ptq4vit"
    config_class = PTQ4ViTConfig

    def __init__(self, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        # quant point name -> (kind of range, lo, hi, mode, observed min) for candidate generation
        self.ranges: dict[str, tuple[str, float, float, str, float]] = {}
        # GELU/SiLU nodes whose every value consumer is a linear (set by transform)
        self.twin_acts: set[str] = set()

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        """Leaves the graph as is; finds the MLP hidden activations eligible for the signed twin."""
        self.twin_acts = twin_act_nodes(graph)
        return {"twin_act_candidates": len(self.twin_acts)}

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if node.opdef.role == "source":
            return super().act_qparams(node, obs, bits, config)
        if node.opdef.unit_interval and bits >= 2:  # attention probabilities
            self.ranges[node.name] = ("twin_softmax", 0.0, 1.0, "unsigned", 0.0)
            return twin_softmax_qparams(bits, best_softmax_shift(obs.sample, bits))
        if node.name in self.twin_acts and obs.min < 0 and bits >= 2:
            self.ranges[node.name] = ("twin_signed", obs.min, obs.max, "signed", obs.min)
            return twin_signed_qparams(obs.min, obs.max, bits, 1.0, _pot_mode(config))
        mode = choose_mode(obs.min, obs.max, config.act_symmetry)
        self.ranges[node.name] = ("uniform", obs.min, obs.max, mode, obs.min)
        return range_to_qparams(torch.tensor(obs.min), torch.tensor(obs.max), bits, mode)

    # -- candidates ------------------------------------------------------------
    def act_candidates(self, name: str, qp: QParams, config: QuantConfig) -> list[QParams]:
        kind, lo, hi, mode, obs_min = self.ranges[name]
        pot = _pot_mode(config)
        if kind == "twin_softmax":
            return [twin_softmax_qparams(qp.bits, m) for m in range(MAX_TWIN_SHIFT + 1)]
        if kind == "twin_signed":
            return _dedupe([twin_signed_qparams(lo, hi, qp.bits, a, pot) for a in ALPHAS])
        cands = []
        for a in ALPHAS:
            c = range_to_qparams(torch.tensor(lo * a), torch.tensor(hi * a), qp.bits, mode)
            if pot is not None:
                c = restrict_pot(c, pot, lo=torch.tensor(obs_min))  # as the engine restricts
            cands.append(c)
        return _dedupe(cands)

    @staticmethod
    def weight_candidates(node: Node, wq: QParams, config: QuantConfig) -> list[torch.Tensor]:
        w = node.params["weight"].detach().flatten(1).float()
        base = w.abs().amax(1).double().clamp_min(1e-8) / wq.qmax
        out = []
        for a in ALPHAS:
            s = base * a
            if config.pot and config.shift_terms == 2:
                s = two_term_round(s).double()
            elif config.pot:
                s = pot_scale(s, _pot_mode(config))
            out.append(s.float())
        return _dedupe_tensors(out)

    # -- search ----------------------------------------------------------------
    def refine(self, qgraph: QuantizedGraph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        graph = qgraph.graph
        x = torch.cat(calib)[:MAX_IMAGES]
        plan: list[tuple[Node, list[str | None], list[str]]] = []
        claimed: set[str] = set()
        for node in graph.where(mac=True):
            srcs: list[str | None] = []
            for inp in node.inputs:
                p = graph.producer(inp).name
                srcs.append(p if p in qgraph.act else None)
            if any(s is not None and qgraph.act[s].axis is not None for s in srcs):
                continue  # per-channel input quantizers: not searched
            owned = [s for s in dict.fromkeys(srcs) if s is not None and s in self.ranges and s not in claimed]
            claimed.update(owned)
            if owned or node.name in qgraph.weight:
                plan.append((node, srcs, owned))
        info: dict[str, Any] = {"images": int(x.shape[0]), "rounds": ROUNDS, "alphas": len(ALPHAS),
                                "layers": len(plan), "groups": 0, "per_layer": {}}
        if not plan:
            return info
        sources = {node.name: srcs for node, srcs, _ in plan}
        owned_of = {node.name: owned for node, _, owned in plan}
        groups = _group_by_budget(graph, [node for node, _, _ in plan], x, CACHE_BUDGET)
        info["groups"] = len(groups)
        before_total = after_total = 0.0
        for group in groups:
            data = collect_layers(graph, group, sources, x)
            with torch.no_grad():
                for node in group:
                    before, after = self._search_layer(qgraph, data.pop(node.name), owned_of[node.name], config)
                    info["per_layer"][node.name] = {"before": before, "after": after}
                    before_total += before
                    after_total += after
        info["objective_before"], info["objective_after"] = before_total, after_total
        qgraph.rebuild()
        return info

    def _search_layer(self, qgraph: QuantizedGraph, layer: LayerData, owned: list[str],
                      config: QuantConfig) -> tuple[float, float]:
        """Alternate weight and activation searches on one layer; (objective before, after)."""
        node = layer.node
        wq = qgraph.weight.get(node.name)
        before = layer.objective(layer.output(qgraph.act, wq))
        w_cands = self.weight_candidates(node, wq, config) if wq is not None else []
        a_cands = {name: self.act_candidates(name, qgraph.act[name], config) for name in owned}
        for _ in range(ROUNDS):
            changed = False
            if wq is not None:
                new = search_weight(layer, qgraph.act, wq, w_cands)
                changed |= not torch.equal(new.scale, wq.scale)
                qgraph.weight[node.name] = wq = new
            for name in owned:
                new_a = search_act(layer, qgraph.act, name, wq, a_cands[name])
                changed |= new_a is not qgraph.act[name]
                qgraph.act[name] = new_a
            if not changed:
                break
        return before, layer.objective(layer.output(qgraph.act, wq))


def _pot_mode(config: QuantConfig) -> str | None:
    """The engine's power-of-two rounding for ``scales='pot'`` (``objective`` counts as ``round``); else None."""
    if not config.pot:
        return None
    return "round" if config.pot_rounding == "objective" else config.pot_rounding

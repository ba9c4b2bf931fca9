"""Outlier scaling keeps the float function and shrinks channel spread."""

from __future__ import annotations

import torch

from hybridquant.config import QuantConfig
from hybridquant.methods.hfq.outlier_scaling import candidate_alphas, layer_error, outlier_scaling
from hybridquant.primitives import is_power_of_two
from tests.methods.conftest import make_toy_graph


def _spread(x: torch.Tensor, dim: int) -> float:
    m = x.abs().transpose(0, dim).flatten(1).max(1).values
    return float(m.max() / m.median())


def test_float_output_unchanged_weights_changed_spread_shrinks(toy_calib):
    graph = make_toy_graph()
    before = graph.clone()
    x = torch.cat(toy_calib)
    ref = before(x)
    info = outlier_scaling(graph, toy_calib, QuantConfig(method="hfq", wbits=6, abits=6, scales="pot"))
    assert info["layers_scaled"] >= 1
    out = graph(x)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    scaled = [r["layer"] for r in info["layers"]]
    assert any(not torch.equal(graph[n].params["weight"], before[n].params["weight"]) for n in scaled)
    # the scaled layers now read inputs with a smaller channel spread
    v_before, v_after = before.run(x, keep=True), graph.run(x, keep=True)
    for name in scaled:
        dim = 1 if graph[name].op == "conv2d" else -1
        assert _spread(v_after[graph[name].inputs[0]], dim) < _spread(v_before[before[name].inputs[0]], dim)
    for r in info["layers"]:
        assert r["error_after"] < r["error_before"]


def test_pot_alphas_are_powers_of_two(toy_calib):
    graph = make_toy_graph()
    info = outlier_scaling(graph, toy_calib, QuantConfig(method="hfq", scales="pot"))
    nodes = graph.by_op("scale_channels")
    assert len(nodes) == sum(r["how"] == "explicit" for r in info["layers"]) >= 1  # not vacuous
    for node in nodes:
        assert all(is_power_of_two(1.0 / v) for v in node.params["inv_alpha"].tolist())
        assert bool((node.params["inv_alpha"] != 1).any())


def test_candidates_include_threshold_and_smooth_families():
    m = torch.tensor([1.0, 1.0, 40.0, 1.2])
    cands = candidate_alphas(m, torch.ones(4), pot=True)
    assert any(float(c[2]) >= 16 and float(c[0]) == 1.0 for c in cands)
    assert all(is_power_of_two(float(v)) for c in cands for v in c)


def test_objective_prefers_scaling_when_outliers_meet_small_weights():
    # the usual trained-network pattern: outlier input channels, small weights reading them
    from hybridquant.graph.ir import Node
    from hybridquant.methods.hfq.outlier_scaling import layer_output

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 6, 6, generator=g)
    w = torch.randn(8, 8, 1, 1, generator=g) * 0.3
    x[:, [1, 5]] *= 30
    w[:, [1, 5]] /= 30
    attrs = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
    node = Node("c", "conv2d", ["x"], attrs, {"weight": w})
    cfg = QuantConfig(method="hfq", wbits=8, abits=6, scales="pot")
    ref = layer_output(node, x, w)
    m = x.abs().transpose(0, 1).flatten(1).max(1).values
    wmax = w.abs().transpose(0, 1).flatten(1).max(1).values
    base = layer_error(node, x, torch.ones_like(m), cfg, ref)
    best = min(layer_error(node, x, a, cfg, ref) for a in candidate_alphas(m, wmax, True))
    assert best < 0.5 * base


def test_a_dead_channel_keeps_alpha_one():
    """A channel whose input is always 0 (a dead ReLU channel) is never rescaled: a tiny factor would shrink its
    weights until their integer bias left int32 (EfficientViT's patch merging, at random init)."""
    x_absmax = torch.tensor([3.0, 0.0, 0.02, 1.0])
    for pot in (True, False):
        for alpha in candidate_alphas(x_absmax, torch.tensor([0.5, 0.5, 0.5, 0.5]), pot):
            assert float(alpha[1]) == 1.0
    assert any(float(a[2]) != 1.0 for a in candidate_alphas(x_absmax, torch.full((4,), 0.5), True))

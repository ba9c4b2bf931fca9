"""HyQ: QADS per-input-channel α on MV2 1x1 convs and SiLU-pinned depthwise inputs."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.methods.hyq import (
    HyQ,
    cache_inputs,
    depthwise_silu_inputs,
    learn_alpha,
    qads_loss,
    qads_targets,
)
from hybridquant.ops import op_def
from hybridquant.primitives import is_power_of_two, sqnr_db
from hybridquant.qparams import range_to_qparams
from hybridquant.quantize import quantize_graph

from .conftest import rel_err

SILU_MIN = op_def("silu").output_min  # x·sigmoid(x) at x ≈ −1.2785


def outlier_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [N, C] of a SiLU-like input with three outlier channels, and a 1x1 weight [O, C, 1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.silu(torch.randn(2048, 24, generator=gen) * 1.5)
    x[:, [2, 11, 19]] *= 30.0
    w = torch.randn(16, 24, 1, 1, generator=gen) * 0.2
    return x, w


def test_learned_alpha_beats_alpha_one_on_outlier_channels():
    x, w = outlier_layer()
    lo, hi = x.amin(0), x.amax(0)
    alpha = learn_alpha(x, w, lo, hi, abits=8, wbits=8, iters=150, lr=0.05, batch=1024)
    assert alpha.shape == (24,) and (alpha > 0).all()
    base = qads_loss(x, w, torch.ones(24), lo, hi, 8, 8)
    learned = qads_loss(x, w, alpha, lo, hi, 8, 8)
    assert learned < 0.7 * base
    assert float(alpha[[2, 11, 19]].min()) > float(alpha.median())  # outlier channels are divided down
    # naive power-of-two rounding of the learned α still helps here
    pot = torch.exp2(torch.floor(torch.log2(alpha) + 0.5))
    assert qads_loss(x, w, pot, lo, hi, 8, 8) < base


def test_zero_iterations_keep_alpha_one():
    x, w = outlier_layer()
    assert torch.equal(learn_alpha(x, w, x.amin(0), x.amax(0), 8, 8, iters=0, lr=0.01), torch.ones(24))


def test_targets_and_pinned_silus(toy_graph, mvit_graph):
    assert [n.name for n in qads_targets(toy_graph)] == ["blk.conv1_1x1.conv", "blk.conv3_1x1.conv"]
    assert depthwise_silu_inputs(toy_graph) == {"blk.conv1_1x1.silu": SILU_MIN}
    targets = qads_targets(mvit_graph)
    assert len(targets) == 14  # 7 MV2 blocks in mobilevit_xxs, expansion + projection each
    assert all(n.block == "mv2" and n.module.endswith(("conv1_1x1.conv", "conv3_1x1.conv")) for n in targets)
    pinned = depthwise_silu_inputs(mvit_graph)
    assert len(pinned) == 7 and all(mvit_graph[p].op == "silu" for p in pinned)


def test_cache_holds_the_layer_inputs(toy_graph, toy_calib):
    layers = qads_targets(toy_graph)
    cache = cache_inputs(toy_graph, layers, toy_calib)
    full = toy_graph.run(torch.cat(toy_calib), keep=True)
    for node in layers:
        pixels, lo, hi = cache[node.name]
        ref = full[node.inputs[0]]
        assert pixels.shape == (32 * 36, ref.shape[1])  # every pixel: the toy data is small
        assert torch.allclose(lo, ref.amin(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(hi, ref.amax(dim=(0, 2, 3)), atol=1e-5)
        rows = ref.permute(0, 2, 3, 1).reshape(-1, ref.shape[1])  # the same pixels, shuffled
        assert torch.allclose(pixels.sort(0).values, rows.sort(0).values, atol=1e-5)


def test_transform_keeps_float_output_and_changes_weights(toy_graph, toy_calib):
    x = torch.cat(toy_calib)
    ref = toy_graph.run(x)
    before = {n.name: n.params["weight"].clone() for n in qads_targets(toy_graph)}
    info = HyQ().transform(toy_graph, toy_calib, QuantConfig.build(method="hyq", iters=60, lr=0.05))
    assert info["layers"] == 2
    assert rel_err(toy_graph.run(x), ref) <= 1e-5
    for name, w in before.items():
        assert not torch.allclose(toy_graph[name].params["weight"], w)
        scale = toy_graph[f"{name}.input_scale"]  # α is an explicit per-channel layer
        assert scale.op == "scale_channels" and scale.attrs["raw_input"]
        stats = info["per_layer"][name]
        assert stats["mse"] < stats["mse_alpha1"]


def test_pot_alpha_is_a_power_of_two(toy_graph, toy_calib):
    HyQ().transform(toy_graph, toy_calib, QuantConfig.build(method="hyq", scales="pot", iters=60, lr=0.1))
    inv = torch.cat([n.params["inv_alpha"] for n in toy_graph.by_op("scale_channels")])
    assert all(is_power_of_two(v) for v in inv.tolist())
    assert (inv != 1).any()


def test_depthwise_input_lower_bound_is_the_silu_minimum(toy_graph, toy_calib):
    q = quantize_graph(toy_graph, QuantConfig.build(method="hyq", iters=5), toy_calib)
    qp = q.act["blk.conv1_1x1.silu"]
    assert qp.zero_point.dim() == 0 and qp.qmin == 0
    lowest = float((qp.qmin - qp.zero_point) * qp.scale)
    assert abs(lowest - SILU_MIN) <= float(qp.scale) / 2
    other = q.act["stem.silu"]  # a SiLU that feeds no depthwise conv keeps its min-max range
    assert other.scale > qp.scale


#: output SQNR (dB) of the quantized tiny mobilevit against its float model on ``calib_images``
#: (measured 26.5 float, 10.4 pot)
MVIT_SQNR_FLOOR = {"float": 22.0, "pot": 7.5}


@pytest.mark.parametrize("scales", ["float", "pot"])
def test_end_to_end(toy_graph, toy_calib, mvit_graph, calib_images, scales):
    """The quantized model carries HyQ's learned α: one explicit per-channel layer per QADS target holding
    1/α (not all 1; powers of two with pot scales), together lowering the summed QADS loss below α = 1's;
    the float function is unchanged; every depthwise conv's SiLU input has the range [SiLU minimum, max]
    (float scales; pot ones keep the observed minimum's zero point); and it
    runs end to end above an SQNR floor. (With pot scales 10 iterations leave every α at 1 after rounding,
    so these runs learn a little longer.)"""
    config = QuantConfig.build(method="hyq", scales=scales, iters=10 if scales == "float" else 60,
                         lr=None if scales == "float" else 0.1)
    q = quantize_graph(toy_graph, config, toy_calib)
    x = torch.cat(toy_calib)
    assert rel_err(q.graph.run(x), toy_graph.run(x)) <= 1e-5
    mvit_q = quantize_graph(mvit_graph, config, calib_images[:8])
    calibs = {id(q): toy_calib, id(mvit_q): [calib_images[:8]]}
    for model in (q, mvit_q):
        info = model.info["transform"]
        targets = qads_targets(model.graph)
        assert len(model.graph.by_op("scale_channels")) == len(targets) == info["layers"] == len(info["per_layer"])
        inv = {n.name: model.graph[f"{n.name}.input_scale"].params["inv_alpha"] for n in targets}
        for name, v in inv.items():
            stats = info["per_layer"][name]
            assert float((1 / v).min()) == pytest.approx(stats["alpha_min"]), name
            assert float((1 / v).max()) == pytest.approx(stats["alpha_max"]), name
            if scales == "pot":
                assert all(is_power_of_two(a) for a in v.tolist())
        assert sum(int((v != 1).sum()) for v in inv.values()) > 0
        losses = info["per_layer"].values()
        assert sum(d["mse"] for d in losses) < sum(d["mse_alpha1"] for d in losses)
        pinned = depthwise_silu_inputs(model.graph)
        assert pinned
        if scales == "float":  # the range is [SILU_MIN, max] exactly, not the observed minimum
            values = model.graph.run(torch.cat(calibs[id(model)]), keep=True)
            for name in pinned:
                hi = float(values[name].max())
                want = range_to_qparams(torch.tensor(SILU_MIN), torch.tensor(hi), 8, "asymmetric")
                qp = model.act[name]
                assert torch.allclose(qp.scale, want.scale, rtol=1e-6, atol=0), name
                assert float(values[name].min()) > SILU_MIN  # the observed minimum is not the pinned one
    assert len(mvit_q.graph.by_op("scale_channels")) == 14
    assert rel_err(mvit_q.graph.run(calib_images), mvit_graph.run(calib_images)) <= 1e-5
    out = mvit_q.run(calib_images)
    assert out.shape == (len(calib_images), 3)
    assert sqnr_db(mvit_graph.run(calib_images), out) > MVIT_SQNR_FLOOR[scales]
    if scales == "pot":
        assert all(qp.is_pot for qp in mvit_q.act.values())

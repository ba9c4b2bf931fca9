"""SmoothQuant: s_j = max|X_j|^a / max|W_j|^(1-a), X/s and W·s."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.graph.ir import Graph
from hybridquant.methods.scaling import input_channel_dim
from hybridquant.methods.smoothquant import (
    SmoothQuant,
    input_channel_absmax,
    smooth_factors,
    smoothing_targets,
)
from hybridquant.primitives import is_power_of_two, sqnr_db
from hybridquant.quantize import quantize_graph

from .conftest import rel_err


def spread(absmax: torch.Tensor) -> float:
    """max / median of per-channel max|X|."""
    return float(absmax.max() / absmax.median())


def consumer_input_absmax(graph: Graph, names: list[str], calib: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return input_channel_absmax(graph, [graph[n] for n in names], calib)


def test_factors_follow_the_formula():
    act = torch.tensor([4.0, 1.5, 0.0, 100.0])
    w = torch.tensor([[1.0, -0.25, 2.0, 0.0], [0.5, 0.5, -1.0, 0.01]])
    s = smooth_factors(act, w, 0.5)
    expected = torch.tensor([(4.0 / 1.0) ** 0.5, (1.5 / 0.5) ** 0.5, 1.0, (100.0 / 0.01) ** 0.5])
    assert torch.allclose(s, expected)  # an all-zero activation channel keeps s = 1
    assert torch.allclose(smooth_factors(act, w, 1.0)[:2], act[:2])
    pot = smooth_factors(act, w, 0.5, pot=True)
    assert all(is_power_of_two(v) for v in pot.tolist())
    # 2, √3, 1, 100 in log2: 1, 0.79, 0, 6.64 — none near a rounding tie, so every CPU agrees
    assert pot.tolist() == [2.0, 2.0, 1.0, 128.0]
    huge = smooth_factors(torch.tensor([1e12]), torch.tensor([[1e-12]]), 0.5)
    assert float(huge) == pytest.approx(1e5)


def test_conv_weight_absmax_is_over_all_weights_of_the_input_channel():
    w = torch.zeros(3, 2, 3, 3)
    w[2, 1, 0, 2] = -8.0
    w[0, 0, 1, 1] = 2.0
    s = smooth_factors(torch.tensor([2.0, 2.0]), w, 0.5)
    assert torch.allclose(s, torch.tensor([1.0, 0.5]))


def test_targets_skip_the_image_conv_and_depthwise(toy_graph, mvit_graph):
    assert [n.name for n in smoothing_targets(toy_graph)] == [
        "blk.conv1_1x1.conv", "blk.conv3_1x1.conv", "tok.fc", "head.fc"]
    names = {n.name for n in smoothing_targets(mvit_graph)}
    assert "stem.conv" not in names and not any("conv2_kxk" in n for n in names)
    assert "head.fc" in names and "stages.3.1.transformer.0.attn.qkv" in names


def test_transform_keeps_float_output_and_changes_weights(toy_graph, toy_calib):
    x = torch.cat(toy_calib)
    ref = toy_graph.run(x)
    before = {n.name: n.params["weight"].clone() for n in smoothing_targets(toy_graph)}
    info = SmoothQuant().transform(toy_graph, toy_calib, QuantConfig(method="smoothquant"))
    assert info["scaled"] == 4 and info["folded"] == 1 and info["explicit"] == 3  # tok.fc folds into the LN
    assert rel_err(toy_graph.run(x), ref) <= 1e-5
    for name, w in before.items():
        assert not torch.allclose(toy_graph[name].params["weight"], w)
    assert toy_graph["tok.norm"].params["weight"][1] != 20.0  # X/s went into the LayerNorm affine


def test_transform_reduces_the_channel_spread(toy_graph, toy_calib):
    names = [n.name for n in smoothing_targets(toy_graph)]
    before = consumer_input_absmax(toy_graph, names, toy_calib)
    SmoothQuant().transform(toy_graph, toy_calib, QuantConfig(method="smoothquant"))
    after = consumer_input_absmax(toy_graph, names, toy_calib)
    for name in ("blk.conv1_1x1.conv", "tok.fc"):  # the layers reading the outlier channels
        assert spread(before[name]) > 10.0
        assert spread(after[name]) < 0.5 * spread(before[name])


def test_on_mobilevit_float_output_is_kept_and_spread_shrinks(mvit_graph, calib_images):
    graph = mvit_graph.clone()
    calib = [calib_images[:8]]
    ref = graph.run(calib_images)
    targets = smoothing_targets(graph)
    names = [n.name for n in targets]
    weights = {n.name: n.params["weight"].clone() for n in targets}
    before = consumer_input_absmax(graph, names, calib)
    info = SmoothQuant().transform(graph, calib, QuantConfig(method="smoothquant"))
    assert info["scaled"] == len(names) and info["folded"] + info["explicit"] == len(names)
    assert rel_err(graph.run(calib_images), ref) <= 1e-5
    assert all(not torch.equal(graph[n].params["weight"], w) for n, w in weights.items())
    after = consumer_input_absmax(graph, names, calib)
    ratios = torch.tensor([spread(after[n]) / spread(before[n]) for n in names])
    assert float(ratios.median()) < 1.0
    # per channel the smoothed max|X_j| is sqrt(max|X_j|·max|W_j|) (a = 0.5)
    node = graph["stages.1.0.conv1_1x1.conv"]
    w_old = weights[node.name].abs().amax(dim=(0, 2, 3))
    assert torch.allclose(after[node.name], (before[node.name] * w_old).sqrt(), rtol=1e-4)
    assert input_channel_dim(node) == 1


#: output SQNR (dB) of the quantized tiny mobilevit against its float model on ``calib_images`` (a floor
#: for a model that runs end to end with its smoothed quantizers; measured 27.0 float, 9.8 pot)
MVIT_SQNR_FLOOR = {"float": 22.0, "pot": 7.0}


@pytest.mark.parametrize("scales", ["float", "pot"])
def test_end_to_end(toy_graph, toy_calib, mvit_graph, calib_images, scales):
    """The quantized model carries SmoothQuant's factors: every target's weight is W·s with s the formula's
    (from the float model's calibration statistics; powers of two with pot scales), X/s is in the producer
    or an explicit shift layer, the float function is unchanged, and it runs end to end above an SQNR floor."""
    config = QuantConfig(method="smoothquant", scales=scales)
    targets = smoothing_targets(toy_graph)
    absmax = input_channel_absmax(toy_graph, targets, toy_calib)
    q = quantize_graph(toy_graph, config, toy_calib)
    x = torch.cat(toy_calib)
    assert rel_err(q.graph.run(x), toy_graph.run(x)) <= 1e-5
    assert q.info["transform"]["scaled"] == len(targets) == 4
    nontrivial = 0
    for node in targets:
        s = smooth_factors(absmax[node.name], node.params["weight"], 0.5, pot=scales == "pot")
        nontrivial += int((s != 1).sum())
        w = node.params["weight"]
        shape = [1] * w.dim()
        shape[1] = -1
        assert torch.allclose(q.graph[node.name].params["weight"], w * s.reshape(shape), rtol=1e-6, atol=0), node.name
        explicit = f"{node.name}.input_scale"
        if explicit in {n.name for n in q.graph}:
            assert torch.allclose(q.graph[explicit].params["inv_alpha"], 1.0 / s, rtol=1e-6, atol=0)
        if scales == "pot":
            assert all(is_power_of_two(v) for v in s.tolist())
    assert nontrivial > 0
    q = quantize_graph(mvit_graph, config, calib_images[:8])
    out = q.run(calib_images)
    assert out.shape == (len(calib_images), 3)
    assert sqnr_db(mvit_graph.run(calib_images), out) > MVIT_SQNR_FLOOR[scales]
    assert rel_err(q.graph.run(calib_images), mvit_graph.run(calib_images)) <= 1e-5
    if scales == "pot":
        assert all(qp.is_pot for qp in q.act.values())
        for node in q.graph.by_op("scale_channels"):  # X/s stays a shift
            assert all(is_power_of_two(v) for v in node.params["inv_alpha"].tolist())

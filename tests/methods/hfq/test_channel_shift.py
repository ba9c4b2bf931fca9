"""Channel shifting into a norm's bias: float function unchanged, input centred, quantized error lower."""

from __future__ import annotations

import torch

from hybridquant.config import QuantConfig
from hybridquant.graph.ir import Graph, Node
from hybridquant.methods.hfq.outlier_scaling import layer_error, layer_output, outlier_scaling
from hybridquant.methods.scaling import apply_input_shift, shift_source
from tests.methods.conftest import make_toy_graph


def _offset_toy() -> Graph:
    """The toy graph with a large LayerNorm bias before ``tok.fc``: a big per-channel offset on its input."""
    graph = make_toy_graph()
    graph["tok.norm"].params["bias"] = 30.0 + torch.linspace(-6.0, 6.0, graph["tok.norm"].params["bias"].numel())
    return graph


def test_shift_source_finds_the_norm_through_layout_ops():
    graph = make_toy_graph()
    assert shift_source(graph, graph["tok.fc"]).name == "tok.norm"
    assert shift_source(graph, graph["head.fc"]).name == "tok.norm2"  # through the select
    assert shift_source(graph, graph["blk.conv1_1x1.conv"]) is None  # reads a SiLU
    assert shift_source(graph, graph["blk.conv2_kxk.conv"]) is None  # 3×3: the padding would see the shift


def test_apply_input_shift_is_exact_in_float():
    graph = _offset_toy()
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = graph.run(x, keep=True)
    z = ref["tok.norm"].flatten(0, 1).mean(0)
    apply_input_shift(graph["tok.fc"], graph["tok.norm"], z)
    out = graph.run(x, keep=True)
    assert torch.allclose(out["tok.fc"], ref["tok.fc"], atol=1e-5)
    assert torch.allclose(out["tok.norm"], ref["tok.norm"] - z, atol=1e-5)


def test_channel_shift_centres_the_input_and_lowers_the_quantized_error(toy_calib):
    graph = _offset_toy()
    before = graph.clone()
    x = torch.cat(toy_calib)
    config = QuantConfig.build(method="hfq", wbits=6, abits=6, scales="pot", channel_shift=True)
    info = outlier_scaling(graph, toy_calib, config)
    assert "tok.fc" in [s["layer"] for s in info["shifts"]]
    assert float((graph(x) - before(x)).norm() / before(x).norm()) <= 1e-5  # float output unchanged
    assert not torch.equal(graph["tok.norm"].params["bias"], before["tok.norm"].params["bias"])
    # the layer's input channels are centred: their means shrink
    mean_before = before.run(x, keep=True)["tok.norm"].flatten(0, 1).mean(0).abs().max()
    xin = graph.run(x, keep=True)[graph["tok.fc"].inputs[0]]
    assert xin.flatten(0, 1).mean(0).abs().max() < 0.1 * mean_before
    # and the quantized output error of the layer, relative to the same float output, is lower
    fc, fc0 = graph["tok.fc"], before["tok.fc"]
    x0 = before.run(x, keep=True)["tok.norm"]
    ref = layer_output(fc0, x0, fc0.params["weight"])
    ones = torch.ones(x0.shape[-1])
    err_before = layer_error(fc0, x0, ones, config, ref)
    x1 = x0 - x0.flatten(0, 1).mean(0)
    err_after = layer_error(fc0, x1, ones, config, layer_output(fc0, x1, fc0.params["weight"]), ref.pow(2).sum())
    assert err_after < err_before
    assert fc.params["bias"].shape == fc0.params["bias"].shape


def test_channel_shift_can_be_switched_off(toy_calib):
    graph = _offset_toy()
    info = outlier_scaling(graph, toy_calib, QuantConfig.build(method="hfq", scales="pot", channel_shift=False))
    assert info["layers_shifted"] == 0


def test_shift_is_refused_when_the_norm_has_other_readers():
    graph = make_toy_graph()
    nodes = [n for n in graph.nodes if n.name != "output"]
    nodes.append(Node("extra", "add", ["tok.norm", "tok.norm"]))
    nodes.append(Node("output", "output", ["head.fc"]))
    g2 = Graph(nodes, graph.meta)
    assert shift_source(g2, g2["tok.fc"]) is None

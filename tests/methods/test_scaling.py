"""Outlier scaling's graph surgery: a per-channel factor folds into the producer where the float function allows."""

from __future__ import annotations

import torch

from hybridquant.graph.ir import Graph, Node
from hybridquant.methods.scaling import apply_input_scaling

CONV = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}


def _norm_conv_graph(op: str, affine: bool = True) -> Graph:
    gen = torch.Generator().manual_seed(0)
    attrs = {"groups": 1, "eps": 1e-5} if op == "group_norm" else {"shape": [4], "eps": 1e-5}
    params = {"weight": torch.rand(4, generator=gen) + 0.5, "bias": torch.randn(4, generator=gen)} if affine else {}
    return Graph([Node("input", "input", []), Node("norm", op, ["input"], attrs, params),
                  Node("conv", "conv2d", ["norm"], CONV, {"weight": torch.randn(3, 4, 1, 1, generator=gen)}),
                  Node("output", "output", ["conv"])], meta={"input_size": [4, 5, 5]})


def test_a_groupnorm_affine_takes_the_scaling():
    """The factors fold into a GroupNorm's per-channel affine (MobileViT-v2): no extra layer, the float output
    unchanged, the affine and the weights changed."""
    graph = _norm_conv_graph("group_norm")
    before = graph.clone()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    alpha = torch.tensor([1.0, 4.0, 0.5, 2.0])
    assert apply_input_scaling(graph, graph["conv"], alpha) == "folded"
    assert not graph.by_op("scale_channels")
    assert torch.allclose(graph(x), before(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(graph["norm"].params["weight"] * alpha, before["norm"].params["weight"])
    assert not torch.equal(graph["conv"].params["weight"], before["conv"].params["weight"])


def test_a_norm_without_affine_gets_an_explicit_scaling():
    graph = _norm_conv_graph("group_norm", affine=False)
    before = graph.clone()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    assert apply_input_scaling(graph, graph["conv"], torch.tensor([1.0, 4.0, 0.5, 2.0])) == "explicit"
    assert len(graph.by_op("scale_channels")) == 1
    assert torch.allclose(graph(x), before(x), rtol=1e-5, atol=1e-5)


def test_a_softmax_read_by_an_explicit_scaling_keeps_its_quantizer():
    """A conv reading a softmax (EfficientFormerV2's talking heads) may take an explicit scaling: the softmax
    keeps its output quantizer (its integer kernel writes those codes), the scaling reads them, and the program
    computes the simulation."""
    from hybridquant.config import QuantConfig
    from hybridquant.integer.executor import IntegerModel
    from hybridquant.integer.lower import lower
    from hybridquant.quantize import quantize_graph

    gen = torch.Generator().manual_seed(0)
    graph = Graph([Node("input", "input", []),
                   Node("c0", "conv2d", ["input"], CONV, {"weight": torch.randn(4, 4, 1, 1, generator=gen)}),
                   Node("sm", "softmax", ["c0"], {"dim": 1}),
                   Node("c1", "conv2d", ["sm"], CONV, {"weight": torch.randn(3, 4, 1, 1, generator=gen)}),
                   Node("output", "output", ["c1"])], meta={"input_size": [4, 5, 5]})
    assert apply_input_scaling(graph, graph["c1"], torch.tensor([1.0, 4.0, 0.5, 2.0])) == "explicit"
    x = torch.randn(8, 4, 5, 5, generator=gen)
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    assert "sm" in qg.act
    logits, _ = IntegerModel(lower(qg)).run(x)
    assert torch.equal(logits, qg.run(x))

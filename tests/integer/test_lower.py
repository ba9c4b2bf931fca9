"""``lower()`` builds the integer program from the quantized graph alone: no image flows through the model,
and the executor that interprets the program reproduces the simulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridquant.config import QuantConfig
from hybridquant.graph import ir
from hybridquant.graph.ir import Graph
from hybridquant.graph.quantized import QuantizedGraph
from hybridquant.integer.executor import IntegerModel
from hybridquant.integer.lower import lower
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import make_toy_graph


@pytest.fixture(scope="module")
def toy_qgraph() -> QuantizedGraph:
    calib = list((torch.rand(32, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * 2 - 1).split(8))
    cfg = QuantConfig.build(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, channel_shift=True,
                            ptf=True, reconstruction=False)
    return quantize_graph(make_toy_graph(), cfg, calib)


def test_lowering_runs_no_data_through_the_model(toy_qgraph, monkeypatch):
    """Shapes come from meta tensors; a real tensor reaching an op or a convolution fails the test (the
    executor's former dry run on a zero image did exactly that)."""
    run_op, conv2d = ir.run_float, F.conv2d

    def meta_run_op(node, inputs):
        assert all(t.is_meta for t in inputs), f"data flowed through {node.name} while lowering"
        return run_op(node, inputs)

    def meta_conv2d(x, *args, **kw):
        assert x.is_meta, "a convolution ran on data while lowering"
        return conv2d(x, *args, **kw)

    def refuse(*args, **kw):
        raise AssertionError("the graph ran while lowering")

    monkeypatch.setattr(ir, "run_float", meta_run_op)
    monkeypatch.setattr(F, "conv2d", meta_conv2d)
    monkeypatch.setattr(Graph, "run", refuse)
    monkeypatch.setattr(QuantizedGraph, "run", refuse)
    program = lower(toy_qgraph)
    assert [op.name for op in program.ops] == [n.name for n in toy_qgraph.graph]
    assert {"conv2d", "channel_requant", "layer_norm", "softmax", "lut"} <= {op.kind for op in program.ops}
    monkeypatch.undo()
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 - 1
    logits, _ = IntegerModel(program).run(x)
    assert torch.equal(logits, toy_qgraph.run(x))


def test_shapes_are_the_float_runs(toy_qgraph):
    graph = toy_qgraph.graph
    want = {name: list(v.shape) for name, v in graph.run(torch.zeros(3, 3, 6, 6), keep=True).items()}
    assert graph.shapes(batch=3) == want
    ops, one = lower(toy_qgraph).ops, graph.shapes()
    assert all(op.out_shape == one[op.name] for op in ops if op.kind not in ("output", "deferred"))
    assert all(op.out_shape is None for op in ops if op.kind == "deferred")


def test_macs_are_per_image_with_patches_folded_into_the_batch(mvit_graph, calib_images):
    """MobileViT folds its patches into the batch dim of token ops: their MACs count every patch."""
    program = lower(quantize_graph(mvit_graph, QuantConfig(method="minmax", scales="pot"), calib_images[:4]))
    qkv = next(op for op in program.ops if op.kind == "linear" and op.out_shape[0] > 1)
    assert program.macs(qkv) == qkv.out_shape[0] * qkv.out_shape[1] * qkv.out_shape[2] * qkv.arrays["weight"].shape[1]
    convs = sum(program.macs(op) for op in program.ops if op.kind == "conv2d")
    assert program.op_counts()["macs"] > convs


def test_an_accumulator_without_a_quantizer_has_a_shape_and_its_macs():
    """A conv read only by an outlier-scaling shift (``raw_input``) gets no quantizer: its accumulator is
    requantized by the shift. Its shape and multiply-accumulates are still in the program."""
    from hybridquant.graph.ir import Node

    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    gen = torch.Generator().manual_seed(0)
    graph = Graph([Node("input", "input", []),
                   Node("pre", "conv2d", ["input"], conv, {"weight": torch.randn(4, 3, 3, 3, generator=gen) * 0.3,
                                                          "bias": torch.zeros(4)}),
                   Node("shift", "scale_channels", ["pre"], {"dim": 1, "raw_input": True},
                        {"inv_alpha": torch.tensor([1.0, 0.5, 2.0, 0.25])}),
                   Node("post", "conv2d", ["shift"], conv, {"weight": torch.randn(4, 4, 3, 3, generator=gen) * 0.2}),
                   Node("output", "output", ["post"])], meta={"input_size": [3, 8, 8]})
    x = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    assert "pre" not in qg.act
    program = lower(qg)
    pre = program["pre"]
    assert "requant" not in pre.attrs and pre.attrs["keep_accumulator"] and pre.out_shape == [1, 4, 8, 8]
    assert program.macs(pre) == 4 * 8 * 8 * 3 * 3 * 3
    assert program.op_counts()["macs"] == program.macs(pre) + program.macs(program["post"])
    logits, _ = IntegerModel(program).run(x)
    assert torch.equal(logits, qg.run(x))


@pytest.mark.parametrize("arch", ["efficientformerv2_s0", "efficientvit_m0"])
def test_hfq_on_the_newer_families_lowers_within_32_bits(arch, calib_images):
    """hfq's outlier scaling leaves EfficientFormerV2's softmax before its talking-heads conv its own grid, and
    EfficientViT's dead ReLU channels their weights: the program lowers, every intermediate fits 32 bits, and it
    computes the simulation exactly."""
    from hybridquant.integer.widths import analyse
    from tests.conftest import family_model

    cfg = QuantConfig.build(method="hfq", scales="pot", wbits=6, abits=6, reconstruction=False)
    qg = quantize_graph(family_model(arch)[1].clone(), cfg, [calib_images[:8]])
    program = lower(qg)
    assert max(row["max_bits"] for row in analyse(program)) <= 32
    logits, _ = IntegerModel(program).run(calib_images[8:12])
    assert torch.equal(logits, qg.run(calib_images[8:12]))

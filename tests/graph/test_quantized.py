"""The fully quantized simulation: coverage, bit widths, scale restriction."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.graph.ir import MAC_OPS, VALUE_OPS
from hybridquant.primitives import sqnr_db
from hybridquant.quantize import quantize_graph


@pytest.fixture(scope="module")
def w8a8(mvit_graph, calib_images):
    return quantize_graph(mvit_graph, QuantConfig(method="minmax"), calib_images)


def test_no_mac_is_missed(mvit_graph, w8a8):
    macs = mvit_graph.by_op(*MAC_OPS)
    assert len(macs) == 35 + 37 + 18  # convs, linears, attention matmuls of mobilevit_xxs
    assert {n.name for n in w8a8.quantized_macs()} == {n.name for n in macs}


def test_every_value_changing_output_is_quantized(mvit_graph, w8a8):
    assert set(w8a8.act) == {n.name for n in mvit_graph if n.op in VALUE_OPS}


def test_every_mac_input_is_on_an_integer_grid(w8a8, calib_images):
    values = w8a8.run(calib_images[:2], keep=True)
    for node in w8a8.graph.by_op(*MAC_OPS):
        for i, name in enumerate(node.inputs):
            qp = w8a8.input_qparams(node, i)
            codes = values[name] / qp.scale + qp.zero_point
            assert torch.allclose(codes, codes.round(), atol=1e-3), node.name


def test_sixteen_bits_is_nearly_float(mvit_graph, calib_images):
    cfg = QuantConfig(method="minmax", wbits=16, abits=16, input_bits=16)
    q16 = quantize_graph(mvit_graph, cfg, calib_images)
    x = calib_images[:4]
    assert sqnr_db(mvit_graph(x), q16(x)) > 50


def test_more_bits_less_error(mvit_graph, calib_images):
    x = calib_images[:4]
    ref = mvit_graph(x)
    errs = [sqnr_db(ref, quantize_graph(mvit_graph, QuantConfig(method="minmax", wbits=b, abits=b), calib_images)(x)) for b in (4, 6, 8)]
    assert errs[0] < errs[1] < errs[2]


def test_pot_scales_are_powers_of_two(mvit_graph, calib_images):
    q = quantize_graph(mvit_graph, QuantConfig(method="minmax", scales="pot"), calib_images)
    assert all(qp.is_pot for qp in q.act.values())
    assert all(qp.is_pot for qp in q.weight.values())


def test_first_last_8bit(mvit_graph, calib_images):
    q = quantize_graph(mvit_graph, QuantConfig(method="minmax", wbits=4, abits=4, first_last_8bit=True), calib_images)
    assert q.weight["stem.conv"].bits == 8 and q.weight["head.fc"].bits == 8
    assert q.weight["stages.1.0.conv1_1x1.conv"].bits == 4
    assert q.act["input"].bits == 8


def test_float_ops_are_left_in_float(mvit_graph, calib_images):
    cfg = QuantConfig(method="minmax", float_ops=("*.softmax",))
    q = quantize_graph(mvit_graph, cfg, calib_images)
    softmax = [n.name for n in mvit_graph.by_op("softmax")]
    assert sorted(q.float_nodes) == sorted(softmax)
    assert not set(softmax) & set(q.act)
    with pytest.raises(HybridQuantError, match="matches no node"):
        quantize_graph(mvit_graph, QuantConfig(method="minmax", float_ops=("nope*",)), calib_images)


def test_quantization_is_deterministic(mvit_graph, calib_images):
    a = quantize_graph(mvit_graph, QuantConfig(method="percentile"), calib_images)
    b = quantize_graph(mvit_graph, QuantConfig(method="percentile"), calib_images)
    x = calib_images[:2]
    assert torch.equal(a(x), b(x))


def test_biases_are_int32_at_input_times_weight_scale(w8a8):
    for name, b in w8a8.bias_int.items():
        assert b.dtype == torch.int64 and int(b.abs().max()) < 2**31  # W8A8: int32 accumulators
        node = w8a8.sim[name]
        scale = w8a8.input_qparams(w8a8.graph[name]).scale * w8a8.weight[name].scale
        assert torch.allclose(node.params["bias"], (b * scale.double()).float())


def test_mobilevitv2_linear_attention_is_quantized(calib_images):
    """v2's separable attention (slice, softmax over tokens, sum, expand) gets quantizers like any op."""
    from tests.conftest import family_model

    graph = family_model("mobilevitv2_050")[1].clone()
    q = quantize_graph(graph, QuantConfig(method="minmax"), calib_images)
    assert set(q.act) == {n.name for n in graph if n.op in VALUE_OPS}
    assert {n.name for n in graph.by_op("sum")} <= set(q.act)
    x = calib_images[:4]
    # a random-init net at W8A8: v1 measures ~25 dB here, v2 ~23 dB
    assert sqnr_db(graph(x), q(x)) > 18


def test_a_channel_of_near_zero_weights_keeps_its_bias_in_the_accumulator():
    """A channel whose weights are all but zero (dead, or scaled down by outlier scaling) would get a weight
    scale so fine that its int32 bias overflows; its scale is raised (a power of two) until the bias is within
    half the accumulator, and the integer program stays within 32 bits and exact."""
    from hybridquant.graph.ir import Graph, Node
    from hybridquant.graph.quantized import BIAS_LIMIT
    from hybridquant.integer.executor import IntegerModel
    from hybridquant.integer.lower import lower
    from hybridquant.integer.widths import analyse

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    w[2] *= 1e-9  # a dead channel with a live bias
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    graph = Graph([Node("input", "input", []),
                   Node("c", "conv2d", ["input"], conv, {"weight": w, "bias": torch.full((4,), 0.5)}),
                   Node("output", "output", ["c"])], meta={"input_size": [3, 6, 6]})
    x = torch.rand(8, 3, 6, 6, generator=gen) * 2 - 1
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    assert int(qg.bias_int["c"].abs().max()) <= BIAS_LIMIT and qg.weight["c"].is_pot
    assert abs(float(qg.graph.run(x)[:, 2].mean()) - 0.5) < 1e-6  # the dead channel's output is its bias
    program = lower(qg)
    assert max(row["max_bits"] for row in analyse(program)) <= 32
    logits, _ = IntegerModel(program).run(x)
    assert torch.equal(logits, qg.run(x))

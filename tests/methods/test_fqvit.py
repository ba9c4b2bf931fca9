"""FQ-ViT: Power-of-Two-Factor LayerNorm inputs and log2 softmax outputs."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.graph.ir import Node
from hybridquant.methods.fqvit import FQViT, channel_axis, log2_softmax_qparams, ptf_qparams
from hybridquant.observers import quant_mse
from hybridquant.primitives import is_power_of_two, sqnr_db
from hybridquant.qparams import range_to_qparams, restrict_pot
from hybridquant.quantize import quantize_graph


def outlier_tokens(seed: int = 0) -> torch.Tensor:
    """[B, N, C] tokens where a few channels are ~40x wider than the rest."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 50, 32, generator=gen)
    x[..., [3, 17, 29]] *= 40.0
    return x


def test_ptf_scales_are_layer_scale_times_two_to_c():
    x = outlier_tokens()
    lo, hi = float(x.min()), float(x.max())
    qp = ptf_qparams(x.reshape(-1, 32), lo, hi, 8, "asymmetric", axis=-1)
    layer = range_to_qparams(torch.tensor(lo), torch.tensor(hi), 8, "asymmetric")
    s = layer.scale / 8
    ratio = qp.scale / s
    assert set(ratio.tolist()) <= {1.0, 2.0, 4.0, 8.0}  # exactly s·2^c, c in 0..3
    assert torch.equal(qp.scale, s * ratio)
    assert qp.zero_point.dim() == 0 and int(qp.zero_point) == int(layer.zero_point)  # one shared zero point
    assert qp.axis == -1 and qp.grid == "uniform"
    # the outlier channels need the widest grid, the narrow channels a finer one
    assert set(ratio[[3, 17, 29]].tolist()) == {8.0}
    assert float(ratio.median()) < 8.0


def test_ptf_has_lower_mse_than_per_tensor_minmax():
    x = outlier_tokens()
    lo, hi = float(x.min()), float(x.max())
    ptf = ptf_qparams(x.reshape(-1, 32), lo, hi, 8, "asymmetric", axis=-1)
    plain = range_to_qparams(torch.tensor(lo), torch.tensor(hi), 8, "asymmetric")
    assert float(quant_mse(x, ptf)) < 0.5 * float(quant_mse(x, plain))


def test_negative_axis_broadcasts_like_the_positive_one():
    x = outlier_tokens()
    qp = ptf_qparams(x.reshape(-1, 32), float(x.min()), float(x.max()), 8, "asymmetric", axis=-1)
    pos = ptf_qparams(x.reshape(-1, 32), float(x.min()), float(x.max()), 8, "asymmetric", axis=2)
    assert torch.equal(qp.fake(x), pos.fake(x))
    # NCHW: channel axis 1 quantizes the same values as tokens along the last dim
    nchw = x.permute(0, 2, 1).reshape(4, 32, 5, 10)
    conv_qp = ptf_qparams(x.reshape(-1, 32), float(x.min()), float(x.max()), 8, "asymmetric", axis=1)
    back = conv_qp.fake(nchw).reshape(4, 32, 50).permute(0, 2, 1)
    assert torch.equal(back, qp.fake(x))


@pytest.mark.parametrize("mode", ["round", "ceil"])
def test_pot_restriction_keeps_the_factors_exact(mode):
    x = outlier_tokens()
    lo, hi = float(x.min()), float(x.max())
    qp = ptf_qparams(x.reshape(-1, 32), lo, hi, 8, "asymmetric", axis=-1)
    c = torch.log2(qp.scale / qp.scale.min())
    pot = restrict_pot(qp, mode, lo=torch.tensor(lo))
    assert pot.is_pot
    assert torch.equal(torch.log2(pot.scale / pot.scale.min()), c)  # every 2^c survives unchanged
    # the zero point stays shared and the widest channel still reaches the minimum
    assert pot.zero_point.dim() == 0
    assert float((pot.qmin - pot.zero_point) * pot.scale.max()) <= lo + float(pot.scale.max())


def test_log2_softmax_outputs_only_powers_of_two_or_zero():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 4, 30, 30, generator=gen) * 3, dim=-1)
    qp = log2_softmax_qparams(8)
    assert qp.grid == "log2" and qp.bits == 4
    out = qp.fake(p)
    nonzero = out[out != 0]
    assert nonzero.numel() > 0 and (out == 0).any()
    assert all(is_power_of_two(v) for v in nonzero.unique().tolist())
    assert float(nonzero.min()) >= 2.0 ** -14 and float(out.max()) <= 1.0
    assert log2_softmax_qparams(3).bits == 3


def test_channel_axis_follows_layout_ops():
    chain = [Node("f", "flatten", ["x"], {"start": 2, "end": -1}), Node("t", "transpose", ["f"], {"dim0": 1, "dim1": 2})]
    assert channel_axis(chain, [1, 8, 6, 6], 8) == 1
    assert channel_axis(chain, [1, 6, 6, 6], 6) == 1  # ambiguous sizes: the probe still finds the right dim
    assert channel_axis([], [1, 36, 8], 8) == -1
    assert channel_axis(chain[:1], [1, 8, 6, 6], 8) is None  # channels never reach the last dim


def test_transform_finds_every_layernorm_input(toy_graph, toy_calib):
    method = FQViT()
    info = method.transform(toy_graph, toy_calib, QuantConfig(method="fq-vit"))
    assert info["ptf_tensors"] == ["blk.add", "tok.add"] and info["log2_softmax"] == 1
    assert method.ptf["blk.add"][0] == 1  # NCHW conv-trunk tensor: channel dim 1
    assert method.ptf["tok.add"][0] == -1  # tokens: last dim


@pytest.mark.parametrize("scales", ["float", "pot"])
def test_end_to_end_on_the_toy_graph(toy_graph, toy_calib, scales):
    """The quantized model is FQ-ViT's: log2 softmax, and on both LayerNorm inputs a PTF quantizer whose
    channels really use different factors 2^c and whose quantization error on those tensors is well under
    the per-tensor min-max quantizer's (measured 0.53-0.57x at W8A8)."""
    q = quantize_graph(toy_graph, QuantConfig(method="fq-vit", scales=scales), toy_calib)
    minmax = quantize_graph(toy_graph, QuantConfig(method="minmax", scales=scales), toy_calib)
    assert q.act["tok.softmax"].grid == "log2"
    values = q.graph.run(torch.cat(toy_calib), keep=True)
    for name, axis in (("blk.add", 1), ("tok.add", -1)):
        qp = q.act[name]
        assert qp.axis == axis and qp.scale.numel() == 8 and qp.zero_point.dim() == 0
        ratio = qp.scale / qp.scale.min()
        assert set(ratio.tolist()) <= {1.0, 2.0, 4.0, 8.0} and len(set(ratio.tolist())) > 1, name
        assert float(quant_mse(values[name], qp)) < 0.75 * float(quant_mse(values[name], minmax.act[name])), name
    if scales == "pot":
        assert all(qp.is_pot for qp in q.act.values() if qp.grid == "uniform")


#: output SQNR (dB) of the quantized tiny mobilevit against its float model on ``calib_images``
#: (measured 25.6 float, 13.3 pot)
MVIT_SQNR_FLOOR = {"float": 21.0, "pot": 10.0}


@pytest.mark.parametrize("scales", ["float", "pot"])
def test_end_to_end_on_mobilevit(mvit_graph, calib_images, scales):
    q = quantize_graph(mvit_graph, QuantConfig(method="fq-vit", scales=scales), calib_images[:8])
    lns = mvit_graph.by_op("layer_norm")
    producers = {mvit_graph.producer(ln.inputs[0]).name for ln in lns}
    assert set(q.info["transform"]["ptf_tensors"]) == producers
    assert all(q.act[p].scale.dim() == 1 for p in producers)
    assert sum(len(set(q.act[p].scale.tolist())) > 1 for p in producers) >= len(producers) // 2  # factors used
    assert all(q.act[n.name].grid == "log2" for n in mvit_graph.by_op("softmax"))
    out = q.run(calib_images)
    assert out.shape == (len(calib_images), 3)
    assert sqnr_db(mvit_graph.run(calib_images), out) > MVIT_SQNR_FLOOR[scales]

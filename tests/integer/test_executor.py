"""The integer program reproduces the simulation bit for bit and refuses float multipliers."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.integer.executor import IntegerModel
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import make_toy_graph


@pytest.fixture(scope="module")
def toy_calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return list((torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1).split(8))


CONFIGS = [
    QuantConfig(scales="pot"),
    QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6),
    QuantConfig(method="hfq", scales="pot", wbits=4, abits=6, shift_terms=2),
    QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, channel_shift=True, ptf=True,
                reconstruction=True, reconstruction_iters=20),
    QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, lut_zero_point=False,
                reconstruction_iters=20),
]


def _node_diffs(qg, im, x):
    trace: dict = {}
    out, _ = im.run(x, trace=trace)
    sim = qg.run(x, keep=True)
    diffs = {}
    for name, v in trace.items():
        qp = qg.act.get(name)
        if qp is not None:  # codes of a threshold grid stand for its levels
            deq = qp.levels.double()[v.q] if qp.kind == "threshold" else (v.q - v.zp).double() * v.scale.double()
            diffs[name] = float(((deq - sim[name].double()).abs() / qp.scale.double()).max())
    return out, sim, diffs


@pytest.mark.parametrize("cfg", CONFIGS, ids=["minmax-pot", "hfq-w6a6", "hfq-two-term", "hfq-w6a6-opt-in", "hfq-w6a6-no-lut-zp"])
def test_toy_graph_is_bit_exact(cfg, toy_calib):
    graph = make_toy_graph()
    qg = quantize_graph(graph, cfg, toy_calib)
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out, sim, diffs = _node_diffs(qg, IntegerModel(qg), x)
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
    assert torch.equal(out, sim["head.fc"])


def test_mobilevit_is_bit_exact(mvit_graph, calib_images):
    qg = quantize_graph(mvit_graph, QuantConfig(scales="pot"), calib_images)
    im = IntegerModel(qg)
    x = calib_images[:4]
    out, codes = im.run(x)
    assert torch.equal(out, qg(x))
    assert codes.q.dtype == torch.int64
    assert im.stats["luts"] >= 30 and im.stats["requant_shifts"] >= 150


@pytest.mark.parametrize("lut_zero_point", [False, True])
def test_mobilevit_with_ptf_and_channel_shift_is_bit_exact(mvit_graph, calib_images, lut_zero_point):
    cfg = QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, channel_shift=True,
                      ptf=True, lut_zero_point=lut_zero_point)
    qg = quantize_graph(mvit_graph, cfg, calib_images)
    assert qg.info["transform"]["ptf_tensors"] and qg.info["transform"]["layers_shifted"]
    assert any(qg.act[n].scale.dim() == 1 for n in qg.info["transform"]["ptf_tensors"])
    x = calib_images[:4]
    out, _ = IntegerModel(qg).run(x)
    assert torch.equal(out, qg(x))


def test_float_multiplier_is_refused_unless_allowed(toy_calib):
    qg = quantize_graph(make_toy_graph(), QuantConfig(scales="float"), toy_calib)
    with pytest.raises(HybridQuantError, match="not a power of two"):
        IntegerModel(qg)
    qg = quantize_graph(make_toy_graph(), QuantConfig(scales="float", float_ops=()), toy_calib)
    # float softmax / LayerNorm cannot be lowered even when float multipliers are allowed
    with pytest.raises(HybridQuantError, match="power-of-two"):
        IntegerModel(qg, allow_float_multipliers=True)


def test_float_nodes_cannot_be_lowered(toy_calib):
    qg = quantize_graph(make_toy_graph(), QuantConfig(scales="pot", float_ops=("tok.softmax",)), toy_calib)
    with pytest.raises(HybridQuantError, match="left in float"):
        IntegerModel(qg)


def test_threshold_grids_read_through_per_channel_tables_are_bit_exact(toy_calib):
    """A SiLU folded into outlier scaling's per-channel shift has no quantizer of its own: its input's
    threshold grid serves every channel's output grid, and the per-channel table is built from the grid."""
    cfg = QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, reconstruction=False)
    qg = quantize_graph(make_toy_graph(), cfg, toy_calib)
    deferred = [n.inputs[0] for n in qg.graph.by_op("silu") if n.name not in qg.act]
    assert deferred and all(qg.act[name].kind == "threshold" for name in deferred)
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 3 - 1.5  # beyond the calibration range
    out, sim, diffs = _node_diffs(qg, IntegerModel(qg), x)
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
    assert torch.equal(out, sim["head.fc"])

"""hfq end to end on the toy graph: power-of-two everywhere, ablations, beats naive PoT."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.primitives import is_power_of_two, is_two_term
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import make_toy_graph


def _err(qg, graph, x):
    return float((qg(x) - graph(x)).pow(2).mean())


def test_hfq_beats_naive_pot_minmax(toy_calib):
    graph = make_toy_graph()
    x = torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 2 - 1  # held-out inputs
    for wb, ab in ((8, 8), (6, 6), (4, 8)):
        naive = quantize_graph(graph, QuantConfig(method="minmax", scales="pot", wbits=wb, abits=ab), toy_calib)
        hfq = quantize_graph(graph, QuantConfig(method="hfq", scales="pot", pot_rounding="objective",
                                                wbits=wb, abits=ab), toy_calib)
        assert _err(hfq, graph, x) < _err(naive, graph, x)
        assert all(q.is_pot for q in hfq.weight.values())
        assert all(q.is_pot for q in hfq.act.values() if q.grid == "uniform")


def test_outlier_scaling_applies_its_factors_and_can_be_switched_off(toy_calib):
    """On: the chosen factors reach the model. Every scaled layer lowered its quantized output error by at
    least MIN_GAIN, its explicit per-channel shift vector holds exactly the reported number of factors
    != 1 (all powers of two), and those vectors are the whole parameter increase beyond the threshold
    grids. Off: none of it. ("on >= off" in parameters alone also holds with every factor 1.)"""
    from hybridquant.methods.hfq.outlier_scaling import MIN_GAIN

    graph = make_toy_graph()
    # no channel shift: centring tok.norm2 would give it a bias (parameters that are not factors)
    cfg = QuantConfig.build(method="hfq", scales="pot", abits=6, reconstruction=False, channel_shift=False)
    on = quantize_graph(graph, cfg, toy_calib)
    off = quantize_graph(graph, cfg.replace(outlier_scaling=False), toy_calib)
    base = graph.num_params()
    assert off.info["transform"]["outlier_scaling"] == "off" and "layers_shifted" not in off.info["transform"]
    assert not off.graph.by_op("scale_channels") and off.info["param_increase_pct"] * base / 100 == pytest.approx(
        off.grid_constants())
    info = on.info["transform"]
    assert info["layers_scaled"] == len(info["layers"]) >= 2
    explicit = 0
    for row in info["layers"]:
        assert row["error_after"] <= (1 - MIN_GAIN) * row["error_before"], row
        if row["how"] == "explicit":
            inv = on.graph[f"{row['layer']}.input_scale"].params["inv_alpha"]
            assert int((inv != 1).sum()) == row["channels_scaled"] > 0, row
            assert all(is_power_of_two(v) for v in inv.tolist())
            explicit += inv.numel()
    assert explicit == info["explicit_alpha_params"] > 0
    added = on.info["param_increase_pct"] * base / 100 - on.grid_constants()  # without the grids' constants
    assert added == pytest.approx(explicit)


def test_two_shift_terms(toy_calib):
    graph = make_toy_graph()
    qg = quantize_graph(graph, QuantConfig(method="hfq", scales="pot", wbits=4, shift_terms=2), toy_calib)
    assert all(is_two_term(v) for q in qg.weight.values() for v in q.scale.tolist())
    # the second term is really used (a power of two is two-term too: ignoring shift_terms would pass above)
    scales = [v for q in qg.weight.values() for v in q.scale.tolist()]
    assert sum(not is_power_of_two(v) for v in scales) > len(scales) // 2
    assert all(q.is_pot for q in qg.act.values() if q.grid == "uniform")
    one = quantize_graph(graph, QuantConfig(method="hfq", scales="pot", wbits=4), toy_calib)
    x = torch.cat(toy_calib)
    assert _err(qg, graph, x) < 1.5 * _err(one, graph, x)  # finer grid: no worse by much, usually better


def test_float_scales_hfq_searches_and_is_no_worse_than_pot(toy_calib):
    # float candidates include every power-of-two one, so float scales may only match or beat pot
    graph = make_toy_graph()
    x = torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 2 - 1  # held-out inputs
    calib = torch.cat(toy_calib)
    kept_float = 0
    for wb, ab in ((8, 8), (6, 6), (4, 8)):
        common = dict(method="hfq", wbits=wb, abits=ab, reconstruction=False)
        floats = quantize_graph(graph, QuantConfig.build(scales="float", **common), toy_calib)
        pots = quantize_graph(graph, QuantConfig.build(scales="pot", **common), toy_calib)
        search = floats.info["refine"]["float_search"]
        assert _err(floats, graph, calib) <= _err(pots, graph, calib)  # by construction on the search images
        assert _err(floats, graph, x) <= 1.05 * _err(pots, graph, x)  # and about as good on held-out images
        if search["kept"] == "float":
            kept_float += 1
            assert search["output_mse_float"] < search["output_mse_pot"]
            assert not all(q.is_pot for q in floats.act.values() if q.grid == "uniform")
            assert _err(floats, graph, calib) < _err(pots, graph, calib)
    assert kept_float >= 2  # the float search really finds better scales, not only the fallback


def test_ptf_gives_layernorm_inputs_per_channel_power_of_two_scales(toy_calib):
    graph = make_toy_graph()
    on = quantize_graph(graph, QuantConfig(method="hfq", scales="pot", abits=6), toy_calib)
    # tok.add feeds tok.norm2 along its last dim; blk.add reaches tok.norm through a transpose (axis 1): skipped
    assert on.info["transform"]["ptf_tensors"] == ["tok.add"]
    qp = on.act["tok.add"]
    assert qp.scale.dim() == 1 and qp.axis == -1 and qp.is_pot and qp.zero_point.dim() == 0
    assert len(set(qp.scale.tolist())) > 1  # the channels really got different factors
    off = quantize_graph(graph, QuantConfig.build(method="hfq", scales="pot", abits=6, ptf=False), toy_calib)
    assert off.act["tok.add"].scale.dim() == 0
    floats = quantize_graph(graph, QuantConfig(method="hfq", scales="float", abits=6), toy_calib)
    assert floats.info["transform"]["ptf_tensors"] == ["tok.add"] and floats.act["tok.add"].scale.dim() == 1


def test_lut_zero_point_gives_silu_inputs_a_zero_point(toy_calib):
    graph = make_toy_graph()
    cfg = QuantConfig.build(method="hfq", scales="pot", pot_rounding="objective", abits=6, wbits=6, reconstruction=False,
                      lut_thresholds=False)
    on = quantize_graph(graph, cfg, toy_calib)
    off = quantize_graph(graph, cfg.replace(lut_zero_point=False), toy_calib)
    silu_inputs = [n.inputs[0] for n in graph.by_op("silu")]
    assert all(on.act[name].qmin == 0 and int(on.act[name].zero_point) > 0 for name in silu_inputs)
    assert any(off.act[name].qmin < 0 for name in silu_inputs)  # the symmetric grid it replaces
    assert off.info["refine"]["act_zero_points_lowered"] == 0
    assert all(q.is_pot for q in on.act.values() if q.grid == "uniform")
    x = torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(9)) * 2 - 1
    naive = quantize_graph(graph, QuantConfig(method="minmax", scales="pot", wbits=6, abits=6), toy_calib)
    assert _err(on, graph, x) < _err(naive, graph, x)


def test_lut_thresholds_give_silu_inputs_grids_that_lose_nothing_at_the_silu_output(toy_calib):
    graph = make_toy_graph()
    # without outlier scaling no SiLU is folded into a per-channel shift: each has its own output grid
    cfg = QuantConfig.build(method="hfq", scales="pot", pot_rounding="objective", abits=6, wbits=6, reconstruction=False,
                      outlier_scaling=False)
    on = quantize_graph(graph, cfg, toy_calib)
    off = quantize_graph(graph, cfg.replace(lut_thresholds=False), toy_calib)
    assert all(q.grid == "uniform" for q in off.act.values())
    assert not any(q.grid == "threshold" for q in quantize_graph(graph, cfg.replace(abits=8), toy_calib).act.values())
    silus = graph.by_op("silu")
    assert on.info["refine"]["lut_threshold_grids"] == len(silus)
    raw: dict[str, torch.Tensor] = {}

    def keep_raw(node, out):
        raw[node.name] = out
        return on._hook(node, out)

    on.sim.run(torch.cat(toy_calib), hook=keep_raw, override=on.override)
    for silu in silus:
        grid, out_qp, x = on.act[silu.inputs[0]], on.act[silu.name], raw[silu.inputs[0]]
        assert grid.grid == "threshold" and grid.is_pot and grid.qmax + 1 <= 2**6
        assert grid.thresholds.numel() == grid.qmax and bool((grid.thresholds.diff() > 0).all())
        # the SiLU output's codes are (almost all) those of the exact conv output
        exact = out_qp.fake(torch.nn.functional.silu(x))
        through_grid = out_qp.fake(torch.nn.functional.silu(grid.fake(x)))
        assert float((exact == through_grid).float().mean()) > 0.99
        assert float((exact == out_qp.fake(torch.nn.functional.silu(off.act[silu.inputs[0]].fake(x))))
                     .float().mean()) < float((exact == through_grid).float().mean())

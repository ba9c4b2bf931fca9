"""Block reconstruction: blocks as timm list elements, learned rounding on the same grid, lower block error."""

from __future__ import annotations

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.methods.hfq.reconstruction import block_key, blocks
from hybridquant.primitives import dequantize
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import make_toy_graph


@pytest.mark.parametrize(("module", "key"), [
    ("stages.2.1.transformer.0.attn.qkv", "stages.2.1.transformer.0"),
    ("stages.2.1.conv_kxk.conv", "stages.2.1"),
    ("stages.1.0.conv1_1x1.bn.act", "stages.1.0"),
    ("stem.conv", "stem"),
    ("head.fc", "head"),
    ("final_conv", "final_conv"),
])
def test_block_key_is_the_deepest_list_element(module, key):
    assert block_key(module) == key


def test_blocks_cover_the_graph_in_order():
    graph = make_toy_graph()
    segs = blocks(graph)
    flat = [n.name for seg in segs for n in seg]
    assert flat == [n.name for n in graph if n.op not in ("input", "output")]
    assert [block_key(seg[0].module) for seg in segs] == ["stem", "blk"]


def _config(**changes) -> QuantConfig:
    # uniform grids on the SiLU inputs: with threshold grids the toy graph's 4-bit blocks leave the learned
    # rounding nothing to gain (blk: relative error 0.163 before, 0.169 after; not kept), while the bundled
    # model keeps most blocks with them (the per-block rows of any hfq report)
    return QuantConfig.build(method="hfq", scales="pot", pot_rounding="objective", wbits=4, abits=4,
                       reconstruction=True, reconstruction_iters=300, lut_thresholds=False).replace(**changes)


def _calib_error(qg, graph, calib) -> float:
    x = torch.cat(calib)
    return float((qg(x) - graph(x)).pow(2).mean())


def test_reconstruction_lowers_block_and_output_error(toy_calib):
    graph = make_toy_graph()
    off = quantize_graph(graph, _config(reconstruction=False), toy_calib)
    on = quantize_graph(graph, _config(), toy_calib)
    rows = on.info["refine"]["reconstruction"]["per_block"]
    assert rows and all((r["error_after"] < r["error_before"]) == r["kept"] for r in rows)
    assert any(r["kept"] for r in rows)
    assert _calib_error(on, graph, toy_calib) < _calib_error(off, graph, toy_calib)
    assert "reconstruction" not in off.info["refine"]


def test_reconstructed_weights_stay_on_their_power_of_two_grid(toy_calib):
    graph = make_toy_graph()
    off = quantize_graph(graph, _config(reconstruction=False), toy_calib)
    on = quantize_graph(graph, _config(), toy_calib)
    changed = 0
    for name, wq in on.weight.items():
        assert wq.is_pot and torch.equal(wq.scale, off.weight[name].scale)  # the grid is the search's
        codes = on.weight_int[name]
        assert int(codes.min()) >= wq.qmin and int(codes.max()) <= wq.qmax
        # the learned weights are exactly codes × scale, so the integer model reproduces them
        assert torch.equal(dequantize(codes, wq.scale, wq.zero_point, axis=0), on.graph[name].params["weight"])
        changed += int((codes != off.weight_int[name]).sum())
    assert changed > 0  # it learned something: some codes differ from GPTQ's


def test_zero_iterations_change_nothing(toy_calib):
    graph = make_toy_graph()
    off = quantize_graph(graph, _config(reconstruction=False), toy_calib)
    zero = quantize_graph(graph, _config(reconstruction_iters=0), toy_calib)
    for name in off.weight_int:
        assert torch.equal(off.weight_int[name], zero.weight_int[name])
    assert zero.info["refine"]["reconstruction"]["blocks"] == 0


def test_reconstruction_runs_on_one_thread_and_restores_the_callers(toy_calib, monkeypatch):
    import hybridquant.methods.hfq.reconstruction as rec

    seen = []
    real = rec._optimise

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "_optimise", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quantize_graph(make_toy_graph(), _config(reconstruction_iters=5), toy_calib)
        assert seen and set(seen) == {1}  # the learned rounding does not depend on the machine's threads
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

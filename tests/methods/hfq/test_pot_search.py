"""Objective power-of-two search: the least-error exponent among its candidates (not just no worse than naive
rounding); exact exponent arithmetic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridquant.config import QuantConfig
from hybridquant.methods.hfq.pot_search import (
    _choose_act,
    _choose_weight,
    _Walker,
    sequential_refine,
    zero_point_moves,
)
from hybridquant.primitives import is_power_of_two, is_two_term, two_term_round
from hybridquant.qparams import QParams, range_to_qparams, restrict_pot, with_scale
from hybridquant.quantize import quantize_graph
from hybridquant.store import Stored
from tests.methods.conftest import make_toy_graph


def _split(walker: _Walker, t: torch.Tensor) -> Stored:
    """``t`` (a value over all search images) in the walker's chunks."""
    return Stored.of(walker.ws, list(t.split(walker.images)), walker.images)


def _pot_minmax(mvit_graph, calib, **kw):
    return quantize_graph(mvit_graph, QuantConfig(method="minmax", scales="pot", **kw), calib)


def test_activation_search_picks_the_best_exponent_and_moves_some(toy_calib):
    """For every per-tensor activation the search returns the exponent with the least consumer error among
    2^(k0 + d), d in -2..1 around the naive one (the walker's error, enumerated here independently), and on
    this graph that is strictly better than naive rounding for several tensors: a search that returned the
    naive exponent unchanged would pass "never worse" but fails here."""
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="pot", abits=6, wbits=6), toy_calib)
    x = torch.cat(toy_calib)
    walker = _Walker(qg, x)
    values = qg.graph.run(x, keep=True)
    improved = []
    for node in qg.graph:
        if node.op == "output":
            continue
        qp = qg.act.get(node.name)
        if qp is None or qp.grid != "uniform" or qp.scale.dim() != 0:
            continue
        raw = _split(walker, values[node.name])
        best, move = _choose_act(walker, node.name, raw, qp)
        assert move == 0  # no zero-point candidates unless asked
        assert is_power_of_two(float(best.scale))
        lo = torch.tensor(-float(qp.zero_point) * float(qp.scale))
        errs = {d: walker.consumer_error(node.name, _split(walker, with_scale(qp, qp.scale * 2.0**d, lo=lo).fake(
                    raw.whole()))) for d in (-2, -1, 0, 1)}
        got = walker.consumer_error(node.name, _split(walker, best.fake(raw.whole())))
        assert got == min(errs.values()), (node.name, got, errs)
        if got < errs[0]:
            improved.append(node.name)
            assert not torch.equal(best.scale, qp.scale)
    # measured: blk.conv1_1x1.conv, blk.conv2_kxk.silu, blk.conv3_1x1.conv, tok.softmax, tok.norm2
    assert len(improved) >= 3, improved


def test_weight_search_picks_the_best_exponent_per_channel(toy_calib):
    """Per output channel the weight exponent is the one of 2^(k_c - 1), 2^k_c, 2^(k_c + 1) with the least
    output error of that channel (enumerated here), and some channels leave naive rounding with a strictly
    lower error."""
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="pot", wbits=4), toy_calib)
    walker = _Walker(qg, torch.cat(toy_calib))
    moved = 0
    for name in ("blk.conv1_1x1.conv", "tok.fc"):
        node = qg.graph[name]
        ins = [walker.ref(i).whole() for i in node.inputs]
        naive = qg.weight[name]
        best, n_moved = _choose_weight(walker, node, naive, True)
        axis = 1 if node.op == "conv2d" else -1
        ref = walker.ref(name).whole()

        def err(qp: QParams, node=node, ins=ins, ref=ref, axis=axis) -> torch.Tensor:
            out = walker.run_with_weight(node, ins, qp)
            return (out - ref).pow(2).transpose(0, axis).flatten(1).sum(1)

        k0 = torch.round(torch.log2(naive.scale.double()))
        cands = torch.stack([err(with_scale(naive, torch.exp2(k0 + d).float())) for d in (-1, 0, 1)])
        assert torch.equal(err(best), cands.min(0).values), name
        assert bool((err(best) <= err(naive)).all())
        better = err(best) < err(naive)
        assert int(better.sum()) == n_moved == int((best.scale != naive.scale).sum()) > 0, name
        assert all(is_power_of_two(v) for v in best.scale.tolist())
        moved += n_moved
    assert moved >= 4


def test_sequential_refine_improves_the_model_output(toy_calib):
    graph = make_toy_graph()
    x = torch.cat(toy_calib)
    ref = graph(x)
    naive = quantize_graph(graph, QuantConfig(method="minmax", scales="pot", wbits=4, abits=6), toy_calib)
    refined = quantize_graph(graph, QuantConfig(method="minmax", scales="pot", wbits=4, abits=6), toy_calib)
    sequential_refine(refined, toy_calib, weight_rounding=True)
    assert (refined(x) - ref).pow(2).mean() < (naive(x) - ref).pow(2).mean()
    assert all(q.is_pot for q in refined.weight.values())


def test_consumers_follow_layout_ops():
    graph = make_toy_graph()
    found = {(c.name, i) for _, c, i in graph.value_users("tok.fc")}
    assert found == {("tok.scores", 0), ("tok.scores", 1), ("tok.attn", 1)}


@settings(max_examples=200)
@given(st.floats(1e-6, 1e6))
def test_two_term_round_is_two_term_and_close(s):
    t = float(two_term_round(torch.tensor([s]))[0])
    assert is_two_term(t)
    assert abs(t - s) / s <= 1 / 6 + 1e-6  # two terms: within 1/6 of any positive value


@settings(max_examples=100)
@given(st.floats(-50, 50), st.floats(0.01, 40), st.sampled_from([4, 6, 8]))
def test_pot_restriction_keeps_zero_exact(lo, width, bits):
    qp = range_to_qparams(torch.tensor(lo), torch.tensor(lo + width), bits, "asymmetric")
    pot = restrict_pot(qp, "round", lo=torch.tensor(lo))
    assert is_power_of_two(float(pot.scale))
    assert float(pot.fake(torch.zeros(1))[0]) == 0.0  # zero stays exactly representable


def test_zero_point_moves_only_for_asymmetric_grids():
    asym = QParams(torch.tensor(0.25), torch.tensor(20, dtype=torch.int32), 0, 63, 6, None)
    assert zero_point_moves(asym) == [0, 2, 5, 10, 15]
    symmetric = QParams(torch.tensor(0.25), torch.tensor(0, dtype=torch.int32), -32, 31, 6, None)
    unsigned = QParams(torch.tensor(0.25), torch.tensor(0, dtype=torch.int32), 0, 63, 6, None)
    assert zero_point_moves(symmetric) == [0] and zero_point_moves(unsigned) == [0]


def test_zero_point_search_gives_up_the_flat_side_of_a_silu(toy_calib):
    """A two-sided SiLU input with a long negative tail: the search lowers the zero point, and its
    consumer error is never worse than the exponent search alone."""
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="pot", abits=6, wbits=6), toy_calib)
    walker = _Walker(qg, torch.cat(toy_calib))
    name = "blk.conv1_1x1.conv"
    ref = walker.ref(name).whole()
    raw = ref + 4.0 * ref.clamp(max=0)  # stretch the negative side 5x
    qp = range_to_qparams(raw.min(), raw.max(), 6, "asymmetric")
    qp = restrict_pot(qp, "round", lo=raw.min())
    plain, no_move = _choose_act(walker, name, _split(walker, raw), qp)
    moved, move = _choose_act(walker, name, _split(walker, raw), qp, zero_point_search=True)
    assert no_move == 0 and move > 0
    assert is_power_of_two(float(moved.scale))
    assert (walker.consumer_error(name, _split(walker, moved.fake(raw)))
            <= walker.consumer_error(name, _split(walker, plain.fake(raw))))
    assert int(moved.zero_point) < int(plain.zero_point)

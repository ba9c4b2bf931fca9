"""The static width analysis bounds every accumulator the integer program computes."""

from __future__ import annotations

import torch

from hybridquant.config import QuantConfig
from hybridquant.integer.executor import IntegerModel, _requant
from hybridquant.integer.lower import lower
from hybridquant.integer.widths import analyse, bits
from hybridquant.quantize import quantize_graph

from ..methods.conftest import make_toy_graph


def test_bits_of_a_magnitude():
    assert [bits(m) for m in (0, 1, 2, 127, 128, 2**31 - 1, 2**31)] == [1, 2, 3, 8, 9, 32, 33]


def _accumulators(program, x):
    """Every op's accumulator on images ``x``, by running the program's kinds as the executor does."""
    model = IntegerModel(program)
    vals, accs, out = {program.ops[0].name: x}, {}, {}
    for op in program.ops:
        kind, c = model._kinds[op.index], model._consts[op.index]
        if kind.result == "none":
            continue
        result = kind.run(op, c, model._state.get(op.index), vals, accs)
        if kind.result == "logits":
            break
        if kind.result == "codes":
            vals[op.name] = result
            continue
        accs[op.name] = out[op.name] = result
        if "requant" in op.attrs:
            vals[op.name] = _requant(op, c, result)
    return out


def test_the_analysis_bounds_every_accumulator():
    graph = make_toy_graph()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.rand(16, *graph.meta["input_size"], generator=gen) * 2 - 1]
    program = lower(quantize_graph(graph, QuantConfig.build(method="hfq", scales="pot", reconstruction_iters=5),
                                   calib))
    rows = {r["name"]: r for r in analyse(program)}
    # images far outside the calibration range saturate the input codes: the extremes of every range
    x = torch.cat([calib[0], torch.rand(16, *graph.meta["input_size"], generator=gen) * 40 - 20])
    got = _accumulators(program, x)
    assert got and set(got) <= set(rows)
    for name, acc in got.items():
        assert int(acc.abs().max()) <= rows[name]["magnitudes"]["acc"], name

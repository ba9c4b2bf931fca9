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


def test_layernorm_bound_holds_where_the_floored_root_is_small():
    """With no fractional bits in the root and no epsilon, r = isqrt(V) can sit well below sqrt(V): the bound on
    the normalised value must still hold (C = 15 and a single 1 gives 305,835 at 16 fractional bits)."""
    import math

    import numpy as np

    from hybridquant.integer.program import ProgramOp
    from hybridquant.ops import program_kind

    rng = np.random.default_rng(0)
    frac = 16
    for c in range(2, 41):
        op = ProgramOp(1, "ln", "layer_norm", "layer_norm", ["x"], {"dim": -1}, {
            "in_zero_point": np.array(0), "ptf_shift": np.array(0), "gamma_q": np.ones(c, np.int64),
            "beta_q": np.zeros(c, np.int64), "eps_q": np.array(0), "frac_bits": np.array(frac),
            "sqrt_frac_bits": np.array(0), "out_shift": np.array(0), "out_zero_point": np.array(0),
            "out_qmin": np.array(-128), "out_qmax": np.array(127), "requant.zero_point": np.array(0)}, [1, c])

        class _Program:
            def __getitem__(self, name, c=c):
                return ProgramOp(0, name, "input", "quantize", [], {}, {}, [1, c])

        bound = program_kind("layer_norm").widths(op, {"x": 3}, {}, _Program())["normalised"]
        samples = [np.eye(c, dtype=np.int64)[0]] + [rng.integers(-3, 4, size=c) for _ in range(200)]
        for x in samples:
            s1, s2 = int(x.sum()), int((x * x).sum())
            v = c * s2 - s1 * s1
            r = max(math.isqrt(v), 1)
            for y in (c * x - s1).tolist():
                assert abs((2 * (y << frac) + r) // (2 * r)) <= bound, (c, x.tolist())

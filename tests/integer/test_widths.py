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


def test_layernorm_bounds_hold_and_fit_int32():
    """The analysed bounds of LayerNorm's intermediates hold on extreme rows (one-hot, constant, alternating,
    random, PTF-shifted 8-bit codes) for every channel count up to 40 and the largest that fits, and all fit
    int32."""
    import math

    import numpy as np
    import torch

    from hybridquant.integer.program import ProgramOp
    from hybridquant.ops import program_kind
    from hybridquant.primitives import arith, shift_right_round

    rng = np.random.default_rng(0)
    top = 255 << 3
    for c in [*range(1, 41), 386]:
        k = arith.layernorm_constants(torch.ones(c), torch.zeros(c), 1e-5, 2**-4, c, 2**-4, -128, 127, 0)
        op = ProgramOp(1, "ln", "layer_norm", "layer_norm", ["x"], {"dim": -1}, {
            "in_zero_point": np.array(0), "ptf_shift": np.array(3), "gamma_q": k["gamma_q"].numpy(),
            "beta_q": k["beta_q"].numpy(), "eps_q": np.array(k["eps_q"]), "out_shift": np.array(k["out_shift"]),
            "out_zero_point": np.array(0), "out_qmin": np.array(-128), "out_qmax": np.array(127),
            "requant.zero_point": np.array(0)}, [1, c])

        class _Program:
            def __getitem__(self, name, c=c):
                return ProgramOp(0, name, "input", "quantize", [], {}, {}, [1, c])

        bound = program_kind("layer_norm").widths(op, {"x": 255}, {}, _Program())
        assert max(bound.values()) < 2**31, (c, bound)
        rows = [np.eye(c, dtype=np.int64)[0] * top, np.full(c, top), np.arange(c) % 2 * 2 * top - top,
                np.eye(c, dtype=np.int64)[0], *[rng.integers(-top, top + 1, size=c) for _ in range(50)]]
        for x in rows:
            total = int(x.sum())
            mean, rem = total // c, total % c
            d = torch.tensor(x - mean)
            v = int((d * d).sum()) - rem * rem // c + k["eps_q"]
            p = min(15, (31 - v.bit_length()) // 2)
            w = v << 2 * p
            t = math.isqrt(w)
            rec = (1 << 30) // max(1, t + (w - t * t > t))
            product = d * rec - (rem * rec + c // 2) // c
            n = shift_right_round(product, 15 - p)
            assert int(d.abs().max()) <= bound["centred"] and v <= bound["variance"]
            assert rem * rec + c // 2 <= bound["mean_fraction"] and int(product.abs().max()) <= bound["product"]
            assert int(n.abs().max()) <= bound["normalised"]


def test_a_per_channel_requantization_meets_each_channels_own_bound():
    """A channel of a large bias that shifts right beside channels of small accumulators that shift left
    (EfficientViT's near-zero channels at W4A8): each channel's shift meets its own accumulator bound, so the
    requantization fits 32 bits where the largest bound under the largest left shift would not."""
    import numpy as np

    from hybridquant.integer.program import ProgramOp
    from hybridquant.integer.widths import _requant

    op = ProgramOp(1, "c", "conv2d", "conv2d", ["x"], out_shape=[1, 2, 1, 1])
    op.attrs["requant"] = {"mode": "shift", "axis": 1}
    op.arrays.update({"weight": np.array([[1], [3]], np.int8), "bias": np.array([2**30, 5], np.int32),
                      "requant.shift": np.array([26, -3], np.int8), "requant.zero_point": np.array(0, np.int8),
                      "requant.qmin": np.array(-128, np.int16), "requant.qmax": np.array(127, np.int16)})
    assert bits(_requant(op, 2**30 + 127)["requant"]) > 32  # one bound for every channel
    assert bits(_requant(op, 2**30 + 127, [2**30 + 127, 3 * 127 + 5])["requant"]) <= 32

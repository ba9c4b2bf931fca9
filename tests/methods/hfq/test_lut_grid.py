"""Threshold grids on lookup-table inputs: lossless up to the table's output grid, merged where they must be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridquant.methods.hfq.lut_grid import lut_input_grid
from hybridquant.primitives import threshold_quantize
from hybridquant.qparams import range_to_qparams, restrict_pot


def _conv_output(n: int = 20000, seed: int = 0) -> torch.Tensor:
    """A BN-folded conv output: two-sided, with a long negative tail (where SiLU dips and comes back)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * 3.0 - 0.5


def _silu_out_qp(x: torch.Tensor, bits: int):
    y = F.silu(x)
    qp = range_to_qparams(y.min(), y.max(), bits, "asymmetric")
    return restrict_pot(qp, "round", lo=y.min())


@pytest.mark.parametrize("in_bits", [6, 8])
def test_grid_is_lossless_where_it_needs_no_merge_and_bounded_where_it_does(in_bits):
    x = _conv_output()
    out_qp = _silu_out_qp(x, 6)
    grid = lut_input_grid(F.silu, out_qp, x, in_bits)
    assert grid.grid == "threshold" and grid.is_pot and grid.qmax + 1 <= 2**in_bits
    assert grid.thresholds.numel() == grid.qmax and bool((grid.thresholds.diff() > 0).all())
    # each level lies in its own interval
    assert torch.equal(threshold_quantize(grid.levels, grid.thresholds, grid.scale), torch.arange(grid.qmax + 1))
    exact, through_grid = out_qp.fake(F.silu(x)), out_qp.fake(F.silu(grid.fake(x)))
    wrong = exact != through_grid
    # every value lands on its own output code, except the few between a true output boundary and the grid
    # point past it: at most one code off, and each within one grid step below a threshold
    assert float(wrong.float().mean()) < 1e-3
    assert float((exact - through_grid).abs().max()) <= float(out_qp.scale) * 1.0001
    bounds = grid.thresholds.double() * float(grid.scale)
    below = (bounds.unsqueeze(0) - x[wrong].double().unsqueeze(1))
    assert bool(((below > 0) & (below <= float(grid.scale))).any(1).all())


def test_grid_beats_the_uniform_grid_it_replaces():
    x = _conv_output(seed=1)
    out_qp = _silu_out_qp(x, 6)
    grid = lut_input_grid(F.silu, out_qp, x, 6)
    uniform = restrict_pot(range_to_qparams(x.min(), x.max(), 6, "asymmetric"), "round", lo=x.min())
    want = F.silu(x)
    err_grid = float((out_qp.fake(F.silu(grid.fake(x))) - want).pow(2).mean())
    err_uniform = float((out_qp.fake(F.silu(uniform.fake(x))) - want).pow(2).mean())
    assert err_grid < err_uniform


def test_merges_follow_the_data():
    """The intervals given up are where the calibration values are fewest: with most values in SiLU's dip
    and a handful spread over the positive side, 2^4 intervals (fewer than the 4-bit output grid needs)
    lose almost nothing."""
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.rand(20000, generator=gen) * -8.0, torch.rand(50, generator=gen) * 8.0])
    out_qp = _silu_out_qp(x, 4)
    assert lut_input_grid(F.silu, out_qp, x, 8).qmax + 1 > 2**4  # merges are needed
    grid = lut_input_grid(F.silu, out_qp, x, 4)
    assert grid.qmax + 1 == 2**4
    wrong = out_qp.fake(F.silu(x)) != out_qp.fake(F.silu(grid.fake(x)))
    assert int(wrong.sum()) <= 5


def test_round_trip_through_dict():
    from hybridquant.qparams import QParams

    x = _conv_output(500)
    grid = lut_input_grid(F.silu, _silu_out_qp(x, 6), x, 6)
    back = QParams.from_dict(grid.to_dict())
    assert back.grid == "threshold" and torch.equal(back.thresholds, grid.thresholds)
    assert torch.equal(back.levels, grid.levels) and torch.equal(back.fake(x), grid.fake(x))

"""Threshold grids for lookup-table inputs: quantize a SiLU's input where its *output* grid changes.

A conv output read only by a SiLU table is quantized twice on its way to the
next layer: to ``b`` bits before the table, and the table's output to ``b``
bits again. Only the second grid reaches a multiply-accumulate. The first
one need not be uniform: what matters is which output code each input lands
on. Here the input's ``2^b`` codes are intervals whose bounds are the
preimages of the output grid's decision boundaries (where
``Q_out(SiLU(x))`` changes), so quantizing the input adds almost no error
beyond the output's own quantizer (a value between a true boundary and the
next grid point of the bounds lands one code off). SiLU dips below zero and comes back, so it needs
a few more intervals than the output grid has codes (about one per negative
output code); the greedy merge below gives them up where the calibration
data puts the fewest values.

In the integer program the requantization of the accumulator becomes a
shift and a comparison with at most ``2^b − 1`` integer thresholds
(:func:`~hybridquant.primitives.arith.requantize_thresholds`); the table is
indexed by the interval's code as before. Multiplier-free, and the stored
tensor keeps ``b`` bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ...primitives import pot_exponent
from ...primitives.arith import lut_codes
from ...qparams import QParams

#: widest lookup-table input given a threshold grid: a b-bit grid stores up to 2^b − 1 thresholds, and at 8 bits
#: (255 per tensor) mobilevit_xxs's 33 grids took the reference checkpoint's W8A8 model to 1.16 % parameters in
#: all, over the 1 % budget, for +0.2 / +0.4 points of agreement with FP32 on the two mobilevit_xxs checkpoints
MAX_BITS = 6
#: the thresholds lie on a power-of-two grid with at least 2^GRID_BITS points over the calibration range: a
#: value between a true output boundary and the next grid point lands one output code off (2.5e-4 of the values
#: of the normal sample in tests/methods/hfq/test_lut_grid.py)
GRID_BITS = 16


def lut_input_grid(fn: Callable[[torch.Tensor], torch.Tensor], out_qp: QParams,
                   values: torch.Tensor | Sequence[torch.Tensor], bits: int,
                   channel_factor: torch.Tensor | None = None, axis: int | None = None) -> QParams:
    """A ``'threshold'`` quantizer for ``values`` (a tensor or its chunks; the input of ``fn``, whose output is quantized with
    ``out_qp``): at most ``2^bits`` intervals, each mapped by ``fn`` and the output grid to one output code.

    ``channel_factor`` (per channel along ``axis`` of ``values``): the table's output of channel ``c`` is
    divided by ``channel_factor[c]`` before ``out_qp`` (outlier scaling's α read through a per-channel
    table), so its grid is ``out_qp.scale · channel_factor[c]``; the intervals then serve every channel.

    The bounds lie on the power-of-two grid ``2^f`` with ``2^f ≤ (max − min) / 2^GRID_BITS`` over the
    calibration range (each bound is the first grid point past an output boundary); beyond that range the
    outer intervals extend to ±∞. Adjacent intervals are merged, cheapest first, until at most ``2^bits``
    remain: the merged interval keeps one side's output codes, and the cost is the squared error this puts
    on the other side's calibration values (in the table's output units, so a channel with a coarser grid
    weighs more per code). Each interval's representative value (its ``levels`` entry) is the middle grid
    point of the run of grid points whose output codes it keeps.
    """
    chunks = [values] if isinstance(values, torch.Tensor) else list(values)
    lo = min(float(c.min()) for c in chunks)
    hi = max(float(c.max()) for c in chunks)
    span = max(hi - lo, 1e-6)
    f = int(pot_exponent(span / 2**GRID_BITS, "floor"))
    step = 2.0**f
    i0, i1 = math.floor(lo / step), math.ceil(hi / step)
    idx = torch.arange(i0, i1 + 1, dtype=torch.int64)
    # one output grid per distinct channel factor: group g has scale out_scale·factor_g
    if channel_factor is None:
        factors = [1.0]
    else:
        channel_factor = channel_factor.double().flatten()
        factors = sorted(set(channel_factor.tolist()))

    def samples(chunk: torch.Tensor) -> list[torch.Tensor]:
        chunk = chunk.detach().double()
        if channel_factor is None:
            return [chunk.flatten()]
        per_channel = chunk.movedim(axis, 0).flatten(1)
        return [per_channel[channel_factor == g].flatten() for g in factors]
    scales = torch.tensor(factors, dtype=torch.float64) * float(out_qp.scale)
    codes = lut_codes(fn, (idx.double() * step).unsqueeze(0), scales.unsqueeze(1), int(out_qp.zero_point),
                      out_qp.qmin, out_qp.qmax)  # [G, grid points]
    # runs of grid points on which every group's output code is constant: run r starts at starts[r]
    change = (codes[:, 1:] != codes[:, :-1]).any(0)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(change).flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([idx.numel()])])
    thresholds = idx[starts[1:]]  # x ≥ thresholds[r]·step lies in run r + 1 or later
    run_codes = codes[:, starts].double()  # [G, K]
    rep = idx[(starts + ends - 1) // 2]
    bounds = thresholds.double() * step
    count = sum(torch.stack([torch.bincount(torch.searchsorted(bounds, v, right=True), minlength=starts.numel())
                             for v in samples(c)]) for c in chunks).double()  # [G, K], summed over the chunks
    weight = (scales**2).unsqueeze(1)
    while run_codes.shape[1] > 1 << bits:
        d2 = (run_codes[:, 1:] - run_codes[:, :-1]).pow(2) * weight
        keep_left = (count[:, 1:] * d2).sum(0)  # run j + 1's values take run j's codes
        keep_right = (count[:, :-1] * d2).sum(0)
        j = int(torch.minimum(keep_left, keep_right).argmin())
        keep = j if keep_left[j] <= keep_right[j] else j + 1
        run_codes[:, j], rep[j] = run_codes[:, keep], rep[keep]
        count[:, j] += count[:, j + 1]
        cols = torch.arange(run_codes.shape[1]) != j + 1
        run_codes, count, rep = run_codes[:, cols], count[:, cols], rep[cols]
        thresholds = torch.cat([thresholds[:j], thresholds[j + 1:]])
    return QParams(torch.tensor(step, dtype=torch.float32), torch.tensor(0, dtype=torch.int32), 0,
                   rep.numel() - 1, bits, None, "threshold", thresholds=thresholds.clone(),
                   levels=(rep.double() * step).float())

"""Pure quantization arithmetic: rounding, quantize / dequantize, shifts.

Everything here is a function of tensors and numbers only — no observers, no
graphs. The integer executor and the simulation share these definitions, so
they round the same way: **round half up** (``floor(x + 0.5)``), which is what
an arithmetic right shift with a rounding bias computes.
"""

from __future__ import annotations

import math

import torch


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties toward +inf: ``floor(x + 0.5)``."""
    return torch.floor(x + 0.5)


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code; ``narrow`` drops -2^(b-1) (symmetric weights)."""
    if signed:
        lo = -(1 << (bits - 1))
        return (lo + 1 if narrow else lo), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _bcast(t: torch.Tensor | float, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """``clamp(round_half_up(x / scale) + zero_point, qmin, qmax)`` as an int32 tensor."""
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    return torch.clamp(round_half_up(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32."""
    qf = q.to(torch.float32)
    return (qf - _bcast(zero_point, qf, axis)) * _bcast(scale, qf, axis)


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize, in float (the simulation's view of an integer tensor)."""
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    # in place on one fresh tensor; clamp(q + z, qmin, qmax) − z == clamp(q, qmin − z, qmax − z),
    # so this is exactly dequantize(quantize(x)), rounding included
    y = x / s
    y.add_(0.5).floor_().clamp_(qmin - z, qmax - z).mul_(s)
    return y


def log2_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """FQ-ViT's log2 quantizer for values in [0, 1]: ``2^-clamp(round(-log2 x), 0, 2^b - 1)``.

    Codes saturating at 2^b − 1 stand for zero, so attention weights below
    the smallest level vanish as in the integer kernel.
    """
    qmax = (1 << bits) - 1
    code = torch.clamp(round_half_up(-torch.log2(x.clamp_min(1e-30))), 0, qmax)
    return torch.where(code >= qmax, torch.zeros_like(x), torch.exp2(-code))


def log_sqrt2_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """RepQ-ViT's log√2 quantizer for values in [0, 1]: ``2^(-q/2)``, ``q = clamp(round(-2·log2 x), 0, 2^b - 1)``.

    Twice as many levels per octave as :func:`log2_fake_quantize`. As there,
    the saturating code 2^b − 1 stands for zero. In integer form an even code
    is a shift by q/2 and an odd code a shift by (q+1)/2 times √2, i.e.
    ``2^-⌈q/2⌉ + (q odd)·(√2 − 1)·2^-⌈q/2⌉`` — two shift sums in ``attn·V``
    whose second is scaled by the constant √2 − 1 inside the requantizer.
    """
    qmax = (1 << bits) - 1
    code = torch.clamp(round_half_up(-2.0 * torch.log2(x.clamp_min(1e-30))), 0, qmax)
    return torch.where(code >= qmax, torch.zeros_like(x), torch.exp2(-0.5 * code))


def twin_fake_quantize(x: torch.Tensor, scale, shift: int, qmin: int, qmax: int) -> torch.Tensor:
    """PTQ4ViT's twin uniform quantizer: a fine range at ``scale`` and a coarse one at ``scale·2^shift``.

    * ``qmin == 0`` (post-softmax): a value uses the fine range, codes
      0..qmax at ``scale``, when its fine code does not saturate, else the
      coarse range, codes 0..qmax at ``scale·2^shift``.
    * ``qmin < 0`` (post-GELU/SiLU): negative values use the fine range
      (codes qmin..0), the others the coarse range (codes 0..qmax).

    One bit of the ``bits``-wide code says which range; shifting a coarse code
    left by ``shift`` puts both on the fine grid, so integer kernels read the
    aligned codes at ``scale``.
    """
    fine = torch.as_tensor(scale, dtype=x.dtype)
    coarse = fine * float(2 ** shift)
    q_fine = round_half_up(x / fine)
    y_coarse = torch.clamp(round_half_up(x / coarse), 0, qmax) * coarse
    if qmin < 0:
        return torch.where(x < 0, torch.clamp(q_fine, qmin, 0) * fine, y_coarse)
    return torch.where(q_fine <= qmax, torch.clamp(q_fine, 0, qmax) * fine, y_coarse)


def threshold_quantize(x: torch.Tensor, thresholds: torch.Tensor, step) -> torch.Tensor:
    """Codes of a threshold grid: the number of decision thresholds ``thresholds_j · step`` at or below ``x``.

    ``thresholds`` are ascending integers on the grid ``step`` (a power of two, so every bound is exact in
    float32 below 2^24); code ``k`` covers ``[t_k·step, t_(k+1)·step)``, codes ``0 … len(thresholds)``.
    Returns int64 codes.
    """
    bounds = thresholds.to(x.dtype) * torch.as_tensor(step, dtype=x.dtype)
    return torch.searchsorted(bounds, x.contiguous(), right=True)


def threshold_table(thresholds: torch.Tensor, levels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(lo, table)`` with ``table[i] = levels[code]`` for the grid index ``lo + i``, from one below the
    first threshold to the last: the code of ``x`` is a lookup of ``floor(x / step)`` instead of a search."""
    if thresholds.numel() == 0:
        return 0, levels[:1].clone()
    lo, hi = int(thresholds[0]) - 1, int(thresholds[-1])
    codes = torch.searchsorted(thresholds.to(torch.int64), torch.arange(lo, hi + 1), right=True)
    return lo, levels[codes]


def threshold_fake_quantize(x: torch.Tensor, thresholds: torch.Tensor, step, levels: torch.Tensor,
                            table: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`threshold_quantize`, each code replaced by its representative value ``levels[code]``.

    Computed as a lookup of ``floor(x / step)`` in :func:`threshold_table` (``table``, when given, is its
    result): since every threshold is an integer, ``t ≤ x / step ⟺ t ≤ floor(x / step)``.
    """
    lo, values = table if table is not None else threshold_table(thresholds, levels)
    k = x / torch.as_tensor(step, dtype=x.dtype)
    k.floor_().clamp_(lo, lo + values.numel() - 1).sub_(lo)
    return torch.take(values.to(x.dtype), k.long())


#: float64 √½, the tie of ``round``: it lies just above the true √½ (irrational), so for every float
#: ``m ≥ SQRT_HALF`` ⟺ ``m > √½`` — no float sits on the tie itself.
SQRT_HALF = 0.7071067811865476
POT_MODES = ("round", "ceil", "floor", "exact")


def pot_exponent(x: torch.Tensor | float, mode: str = "round") -> torch.Tensor:
    """Exponent k of the power of two 2^k that replaces ``x > 0`` (elementwise), as int64.

    The one place where a power-of-two decision is made (scales, requantization multipliers, outlier
    factors). The exponent is read from the float's bits — ``x = m·2^e`` with ``m ∈ [0.5, 1)`` by
    ``frexp`` — and decided by comparing ``m`` with exact constants, never by a float ``log2``, so every
    CPU gives the same answer (float32 inputs are widened to float64 exactly):

    * ``round``: nearest in log2, ``k = e`` when ``m ≥ √½`` else ``e − 1``; the tie log2 m = −½ is
      irrational, compared with float64 √½ (:data:`SQRT_HALF`), so it rounds up from there;
    * ``ceil``: smallest ``2^k ≥ x``: ``e − 1`` when ``m = ½`` (x a power of two) else ``e``;
    * ``floor``: largest ``2^k ≤ x``: ``e − 1``;
    * ``exact``: ``x`` must be 2^k (``ValueError`` otherwise); returns k.
    """
    # a Python float is a float64: keep all its bits (as_tensor alone would make it a float32)
    t = x.detach().to("cpu", torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    if not bool(((t > 0) & torch.isfinite(t)).all()):
        raise ValueError("a power-of-two exponent needs finite values > 0")
    m, e = torch.frexp(t)
    e = e.to(torch.int64)
    if mode == "round":
        return torch.where(m >= SQRT_HALF, e, e - 1)
    if mode == "ceil":
        return torch.where(m == 0.5, e - 1, e)
    if mode == "floor":
        return e - 1
    if mode == "exact":
        if not bool((m == 0.5).all()):
            raise ValueError("not a power of two")
        return e - 1
    raise ValueError(f"unknown power-of-two rounding '{mode}' (choose from {', '.join(POT_MODES)})")


def exp2_int(k: torch.Tensor | int) -> torch.Tensor:
    """``2^k`` for integer ``k`` in [−1022, 1023] as float64, built from the bits (exact everywhere)."""
    k = torch.as_tensor(k, dtype=torch.int64)
    if not bool(((k >= -1022) & (k <= 1023)).all()):
        raise ValueError("power-of-two exponent outside the float64 normal range")
    return ((k + 1023) << 52).view(torch.float64)


def pot_scale(x: torch.Tensor | float, mode: str = "round") -> torch.Tensor:
    """``2^pot_exponent(x, mode)`` as float64 (exact)."""
    return exp2_int(pot_exponent(x, mode))


def is_power_of_two(x: float) -> bool:
    """True when ``x`` is exactly 2^k for an integer k."""
    if x <= 0 or not math.isfinite(x):
        return False
    mantissa, _ = math.frexp(x)
    return mantissa == 0.5


def shift_right_round(acc: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """Arithmetic shift of int64/int32 ``acc`` by ``shift`` bits with round half up.

    ``shift > 0`` divides by 2^shift, rounding half toward +inf (add 2^(shift-1),
    then shift right — exactly ``floor(acc / 2^shift + 0.5)``, negative values
    included); ``shift <= 0`` multiplies by 2^-shift. Computed in int64.
    """
    acc = acc.to(torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64, device=acc.device)
    right = shift.clamp_min(0)
    left = (-shift).clamp_min(0)
    bias = torch.where(right > 0, torch.ones_like(right) << (right - 1).clamp_min(0), torch.zeros_like(right))
    return torch.where(shift > 0, (acc + bias) >> right, acc << left)


def saturate(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Clamp integer codes into [qmin, qmax]."""
    return torch.clamp(q, qmin, qmax)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB."""
    ref = reference.double()
    return sqnr_from_sums(ref.pow(2).sum(), (ref - approx.double()).pow(2).sum())


def sqnr_from_sums(signal: torch.Tensor, noise: torch.Tensor) -> float:
    """SQNR in dB from the summed squares of the reference (``signal``) and of the error (``noise``), so it
    can be accumulated batch by batch; ``inf`` without noise."""
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))


def two_term_round(scale: torch.Tensor) -> torch.Tensor:
    """Nearest value of the form 2^a, 2^a + 2^b or 2^a − 2^b (b < a) to each ``scale``.

    A requantization multiplier built from such a weight scale and power-of-two
    activation scales is two shifts and an add: still multiplier-free.
    """
    s = scale.detach().double() if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float64)
    a_lo = pot_exponent(s, "floor")
    best = exp2_int(a_lo)
    for a in (a_lo, a_lo + 1):
        p = exp2_int(a)
        r = (s - p).abs()
        b = torch.minimum(pot_exponent(r.clamp_min(1e-300), "round"), a - 1)
        for cand in (p, p + torch.sign(s - p) * exp2_int(b)):
            best = torch.where((cand - s).abs() < (best - s).abs(), cand, best)
    return best.float()


def is_two_term(x: float) -> bool:
    """True when ``x`` is 2^a or 2^a ± 2^b for integers b < a."""
    if x <= 0 or not math.isfinite(x):
        return False
    mantissa, _ = math.frexp(x)
    n = int(mantissa * 2**53)
    if n != mantissa * 2**53:
        return False
    n >>= (n & -n).bit_length() - 1  # the odd part: 1, 2^k + 1 or 2^k − 1
    return n == 1 or ((n - 1) & (n - 2)) == 0 or ((n + 1) & n) == 0

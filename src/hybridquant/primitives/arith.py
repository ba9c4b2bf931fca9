"""Integer arithmetic kernels shared by the integer executor and the simulation.

Every *kernel* here takes and returns int64 tensors and uses only integer
tensor operations (add, multiply, shifts, comparisons, floor division,
gathers): the result is a deterministic function of the integer inputs, the
same bit for bit on any device. Loops run over a small fixed number of bit
positions, never over elements. Float parameters (scales, ``exp``, LayerNorm
weights) are turned into integer tables and constants by separate *setup*
functions (:func:`multiplier_to_shifts`, :func:`build_lut`,
:func:`build_channel_lut`, :func:`softmax_exp_table`,
:func:`layernorm_constants`), which compute in float64 on the CPU.

Rounding is **round half up** (``floor(v + 1/2)``, ties toward +inf) in every
kernel, as in :mod:`hybridquant.primitives`: a right shift by ``n`` adds
``2^(n-1)`` first (:func:`~hybridquant.primitives.shift_right_round`), a
division by a positive ``d`` is ``(2·num + d) // (2·d)``
(:func:`div_round_half_up`).

Overflow: the kernels check the magnitudes of their actual operands against
int64 before computing and raise :class:`OverflowError` instead of wrapping.
The supported envelope is documented on each kernel (8- and 16-bit codes,
accumulators within int32, LayerNorm over at most 1024 channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _bcast, is_power_of_two, is_two_term, round_half_up, shift_right_round

__all__ = [
    "align",
    "apply_channel_lut",
    "apply_lut",
    "bit_length",
    "build_channel_lut",
    "build_lut",
    "div_round_half_up",
    "bilinear_taps",
    "int_groupnorm",
    "int_upsample_bilinear",
    "int_layernorm",
    "int_log2_softmax",
    "int_softmax",
    "isqrt",
    "fraction_shift",
    "groupnorm_shifts",
    "layernorm_fits",
    "norm_extra_bits",
    "norm_row_fits",
    "layernorm_headroom",
    "layernorm_constants",
    "lut_codes",
    "multiplier_to_shifts",
    "requantize",
    "requantize_thresholds",
    "requantize_two_term",
    "softmax_exp_table",
]

#: every intermediate is kept below 2^INT64_SAFE_BITS (one bit of headroom under int64)
INT64_SAFE_BITS = 62
#: √2 ≈ 181/128: the log2 softmax rounds log2(S/E) at k + 1/2 by comparing E·2^k·181 with S·128
SQRT2_NUM, SQRT2_DEN = 181, 128
#: LayerNorm: one reciprocal per row ``⌊2^LN_RECIPROCAL_BITS / r⌋``; normalised values keep LN_FRAC_BITS
LN_RECIPROCAL_BITS, LN_FRAC_BITS = 30, 15
#: softmax: one reciprocal per row ``⌊2^SOFTMAX_RECIPROCAL_BITS / S⌋``
SOFTMAX_RECIPROCAL_BITS = 30
#: LayerNorm/GroupNorm rows: ``rem²`` and ``rem·R`` (``R ≤ 46341``) stay in int32 for at most this many values
LN_MAX_ROW = 46340


# --- helpers ---------------------------------------------------------------------
def _i64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.to(torch.int64)


def _absmax(t: torch.Tensor | int) -> int:
    """Largest magnitude in ``t`` as a Python int (0 for an empty tensor)."""
    if isinstance(t, torch.Tensor):
        return int(t.abs().max()) if t.numel() else 0
    return abs(int(t))


def _max(t: torch.Tensor | int) -> int:
    if isinstance(t, torch.Tensor):
        return int(t.max()) if t.numel() else 0
    return int(t)


def _min(t: torch.Tensor | int) -> int:
    if isinstance(t, torch.Tensor):
        return int(t.min()) if t.numel() else 0
    return int(t)


def _guard(bound: int, what: str) -> None:
    """Raise OverflowError when the worst-case magnitude ``bound`` reaches 2^62."""
    if bound >= 1 << INT64_SAFE_BITS:
        raise OverflowError(f"{what}: worst case {bound} (~2^{bound.bit_length()}) does not fit int64 safely")


def div_round_half_up(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``floor(num / den + 1/2)`` for integer tensors with ``den > 0``.

    Rounding: round half up, negative numerators included, computed exactly as
    the floor division ``(2·num + den) // (2·den)``. The caller keeps
    ``|2·num| + den`` within int64 (the kernels below check this).
    """
    num, den = _i64(num), _i64(den)
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """Exact floor square root of a non-negative int64 tensor, elementwise.

    Rounding: floor, ``r = ⌊√v⌋`` exactly (``r² ≤ v < (r+1)²``) for every
    ``0 ≤ v ≤ 2^63 − 1``. Pure integer: the binary digit-by-digit method, 32
    fixed iterations over the bit pairs of ``v`` (no float estimate), so the
    result cannot depend on a float unit. Raises ValueError on negative input.
    """
    v = _i64(v)
    if v.numel() and int(v.min()) < 0:
        raise ValueError("isqrt of a negative value")
    rem = v.clone()
    res = torch.zeros_like(v)
    bit = 1 << 62  # highest power of four in int64
    for _ in range(32):
        trial = res + bit
        take = rem >= trial
        rem = torch.where(take, rem - trial, rem)
        res = torch.where(take, (res >> 1) + bit, res >> 1)
        bit >>= 2
    return res


# --- 1. requantization -----------------------------------------------------------
def requantize(acc: torch.Tensor, shift: torch.Tensor | int, zero_point: torch.Tensor | int,
               qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Power-of-two requantization: ``clamp(shift_right_round(acc, shift) + zero_point, qmin, qmax)``.

    ``acc`` is an integer accumulator; ``shift`` and ``zero_point`` are ints or
    per-channel int tensors laid along ``axis`` of ``acc``. Rounding: round
    half up (``shift > 0`` adds ``2^(shift-1)`` then shifts right
    arithmetically); ``shift ≤ 0`` multiplies by ``2^-shift`` exactly.
    Then saturate. Range: ``|acc|·2^max(0, -shift) + 2^max(0, shift) < 2^62``
    (checked), e.g. any int32 accumulator with ``-30 ≤ shift ≤ 61``.
    """
    acc = _i64(acc)
    if isinstance(shift, torch.Tensor):
        shift = _bcast(_i64(shift), acc, axis)
    if isinstance(zero_point, torch.Tensor):
        zero_point = _bcast(_i64(zero_point), acc, axis)
    left, right = max(0, -_min(shift)), max(0, _max(shift))
    _guard((_absmax(acc) << left) + (1 << right), "requantize shifted accumulator")
    return torch.clamp(shift_right_round(acc, shift) + zero_point, qmin, qmax)


def requantize_two_term(acc: torch.Tensor, a: torch.Tensor | int, b: torch.Tensor | int,
                        sign: torch.Tensor | int, n: torch.Tensor | int, zero_point: torch.Tensor | int,
                        qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Requantize by ``M = (2^a + sign·2^b)·2^-n`` with two shifts and an add.

    ``sign`` is +1, −1 or 0 (single term; ``b`` is then ignored); each
    parameter is an int or a per-channel int tensor along ``axis``. The exact
    product ``acc·M`` is rounded once, half up:
    ``shift_right_round((acc << a) + sign·(acc << b), n)``, then
    ``+ zero_point`` and clamp to [qmin, qmax]. Negative ``a``/``b`` are first
    normalised away by adding the same amount to ``a``, ``b`` and ``n``
    (``M`` unchanged), so no shift amount is negative; ``n ≤ 0`` is an exact
    left shift. Range (after normalising):
    ``|acc|·2^(max(a, b) + 1 + max(0, −n)) + 2^max(0, n) < 2^62`` (checked),
    e.g. an int32 accumulator with ``a, b ≤ 29`` and ``n ≤ 60``.
    """
    acc = _i64(acc)
    total, n = _two_term_sum(acc, a, b, sign, n, axis)
    return torch.clamp(shift_right_round(total, n) + _param(zero_point, acc, axis), qmin, qmax)


def requantize_thresholds(acc: torch.Tensor, a: torch.Tensor | int, b: torch.Tensor | int,
                          sign: torch.Tensor | int, n: torch.Tensor | int, thresholds: torch.Tensor,
                          axis: int | None = None) -> torch.Tensor:
    """Requantize onto a threshold grid: ``code = #{j : thresholds_j ≤ floor(acc·M)}``.

    ``M = (2^a + sign·2^b)·2^-n`` takes the accumulator to the thresholds' grid (parameters as in
    :func:`requantize_two_term`; ``sign = 0`` for a single shift). Since each threshold is an integer,
    ``acc·M ≥ t ⟺ floor(acc·M) ≥ t``: the arithmetic right shift by ``n`` (floor, no rounding bias) of
    ``(acc << a) + sign·(acc << b)`` gives the code exactly, with comparisons only. ``thresholds`` are
    ascending integers; codes ``0 … len(thresholds)``. Same range check as :func:`requantize_two_term`.
    """
    acc = _i64(acc)
    total, n = _two_term_sum(acc, a, b, sign, n, axis)
    n = torch.as_tensor(n, dtype=torch.int64)
    v = torch.where(n > 0, total >> n.clamp_min(0), total << (-n).clamp_min(0))
    return torch.searchsorted(_i64(thresholds).contiguous(), v.contiguous(), right=True)


def _param(t: torch.Tensor | int, acc: torch.Tensor, axis: int | None) -> torch.Tensor | int:
    return _bcast(_i64(t), acc, axis) if isinstance(t, torch.Tensor) else int(t)


def _two_term_sum(acc: torch.Tensor, a, b, sign, n, axis: int | None):
    """``((acc << a) + sign·(acc << b), n)`` with ``a, b`` lifted to ``≥ 0`` (``n`` with them), range-checked."""
    a, b, sign, n = (_param(t, acc, axis) for t in (a, b, sign, n))
    if isinstance(sign, torch.Tensor):
        if sign.numel() and not bool(((sign == 0) | (sign == 1) | (sign == -1)).all()):
            raise ValueError("sign must be -1, 0 or +1")
        b_eff = torch.where(sign != 0, torch.as_tensor(b), torch.as_tensor(a))
    else:
        if sign not in (-1, 0, 1):
            raise ValueError("sign must be -1, 0 or +1")
        b_eff = b if sign != 0 else a
    # normalise: lift a, b (and n with them) until both are >= 0
    if isinstance(a, torch.Tensor) or isinstance(b_eff, torch.Tensor):
        a_t, b_t = torch.as_tensor(a), torch.as_tensor(b_eff)
        lift = (-torch.minimum(torch.minimum(a_t, b_t), torch.zeros_like(a_t))).clamp_min(0)
        a, b_eff, n = a_t + lift, b_t + lift, torch.as_tensor(n) + lift
    else:
        lift = max(0, -min(a, b_eff))
        a, b_eff, n = a + lift, b_eff + lift, n + lift
    top = max(_max(a), _max(b_eff)) + max(0, -_min(n))
    _guard((_absmax(acc) << (top + 1)) + (1 << max(0, _max(n))), "requantize_two_term shifted accumulator")
    return (acc << a) + sign * (acc << b_eff), n


def multiplier_to_shifts(m: float, terms: int) -> tuple[int, int, int, int]:
    """Decompose an exact multiplier into ``(a, b, sign, n)`` with ``m = (2^a + sign·2^b)·2^-n``.

    ``terms=1`` accepts only exact powers of two (returns ``sign = 0, b = 0``);
    ``terms=2`` accepts 2^e, 2^e1 + 2^e2 and 2^e1 − 2^e2 (e2 < e1; a power of
    two again gives ``sign = 0``; for values with both forms, e.g. 3, the
    ``+`` form is chosen). The result is normalised for
    :func:`requantize_two_term`: ``a, b, n ≥ 0`` and ``n`` as small as
    possible. Anything else (not exactly representable, ≤ 0, non-finite,
    other ``terms``) raises ValueError. Setup-time function (float input).
    """
    if terms not in (1, 2):
        raise ValueError(f"terms must be 1 or 2, not {terms}")
    m = float(m)
    if not (is_power_of_two(m) if terms == 1 else is_two_term(m)):
        what = "a power of two" if terms == 1 else "of the form 2^a or 2^a ± 2^b"
        raise ValueError(f"multiplier {m!r} is not exactly {what}")
    mantissa, exp = math.frexp(m)
    odd = int(mantissa * 2**53)  # exact: m = odd·2^(exp-53)
    e = exp - 53
    tz = (odd & -odd).bit_length() - 1
    odd >>= tz
    e += tz  # m = odd·2^e with odd odd
    if odd == 1:
        hi, lo, sign = e, e, 0
    elif ((odd - 1) & (odd - 2)) == 0:  # odd = 2^p + 1
        hi, lo, sign = e + (odd - 1).bit_length() - 1, e, 1
    else:  # odd = 2^p − 1
        hi, lo, sign = e + (odd + 1).bit_length() - 1, e, -1
    n = max(0, -lo)
    return hi + n, (lo + n if sign else 0), sign, n


# --- 2. alignment ----------------------------------------------------------------
def align(q: torch.Tensor, zero_point: torch.Tensor | int, exp_from: torch.Tensor | int,
          exp_to: torch.Tensor | int, axis: int | None = None) -> torch.Tensor:
    """Re-express codes at scale ``2^exp_from`` as zero-point-free codes at the finer ``2^exp_to``.

    Returns ``(q − zero_point) << (exp_from − exp_to)``: exact, no rounding
    (the finer grid contains the coarser one). Used to bring residual-add and
    concat operands, and PTF channels (scale ``s·2^c_j``), to one common
    scale. Any argument may be a per-channel int tensor along ``axis``.
    Requires ``exp_to ≤ exp_from`` (ValueError otherwise) and the result below
    2^62 (OverflowError).
    """
    q = _i64(q)

    def prm(t):
        return _bcast(_i64(t), q, axis) if isinstance(t, torch.Tensor) else int(t)

    zero_point, exp_from, exp_to = prm(zero_point), prm(exp_from), prm(exp_to)
    delta = exp_from - exp_to
    if _min(delta) < 0:
        raise ValueError("align only refines: exp_to must be <= exp_from")
    centred = q - zero_point
    _guard(_absmax(centred) << _max(delta), "align")
    return centred << delta


# --- 3. lookup tables ------------------------------------------------------------
def build_lut(fn: Callable[[torch.Tensor], torch.Tensor], in_scale: float, in_zp: int, in_qmin: int,
              in_qmax: int, out_scale: float, out_zp: int, out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Table of an elementwise function from input codes to output codes (setup time).

    ``table[i] = clamp(round_half_up(fn((i + in_qmin − in_zp)·in_scale) / out_scale) + out_zp,
    out_qmin, out_qmax)`` for ``i = 0 … in_qmax − in_qmin``, evaluated in
    float64 on the CPU (``fn`` receives a float64 tensor). Rounding: round
    half up of the float64 quotient. Returns an int64 tensor of
    ``in_qmax − in_qmin + 1`` entries; apply with :func:`apply_lut`.
    """
    codes = torch.arange(in_qmin, in_qmax + 1, dtype=torch.float64)
    return lut_codes(fn, (codes - in_zp) * float(in_scale), out_scale, out_zp, out_qmin, out_qmax)


def lut_codes(fn: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, out_scale, out_zp,
              out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Output codes of ``fn`` at the input ``values`` (setup time): the entries of a lookup table.

    ``clamp(round_half_up(fn(values) / out_scale) + out_zp, out_qmin, out_qmax)``; ``fn`` runs in float32,
    as in the simulation, so a table reproduces it bit for bit; the quotient is rounded in float64.
    ``out_scale`` and ``out_zp`` are numbers or tensors that broadcast with ``values`` (``[C, 1]`` against
    ``[1, levels]`` for a per-channel table). Returns int64.
    """
    y = fn(values.float()).to(torch.float64)
    out = round_half_up(y / torch.as_tensor(out_scale, dtype=torch.float64)) + torch.as_tensor(out_zp)
    return torch.clamp(out, out_qmin, out_qmax).to(torch.int64)


def apply_lut(q: torch.Tensor, table: torch.Tensor, in_qmin: int) -> torch.Tensor:
    """Elementwise lookup ``table[q − in_qmin]`` (no arithmetic, so no rounding).

    Raises ValueError for codes outside ``[in_qmin, in_qmin + len(table) − 1]``
    instead of wrapping around.
    """
    idx = _i64(q) - in_qmin
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= table.numel()):
        raise ValueError(f"codes outside the table's input range [{in_qmin}, {in_qmin + table.numel() - 1}]")
    return table.to(device=idx.device, dtype=torch.int64)[idx]


def build_channel_lut(fn: Callable[[torch.Tensor], torch.Tensor], in_scale, in_zp, in_qmin: int,
                      in_qmax: int, out_scale: torch.Tensor, out_zp, out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Per-channel table, shape ``[C, levels]``, for a non-linearity with per-channel output scale.

    Row ``j`` is :func:`build_lut` with ``out_scale[j]`` (and ``out_zp[j]``,
    ``in_scale[j]``, ``in_zp[j]`` where these are given per channel): the
    non-linearity reads the producer's codes and its output is at once divided
    per channel by α_j, so ``out_scale[j] = s_out·α_j`` folds that division
    into the table. Same evaluation (``fn`` in float32) and round-half-up rule
    as :func:`build_lut`. Apply with :func:`apply_channel_lut`.
    """
    out_scale = torch.as_tensor(out_scale, dtype=torch.float64).reshape(-1)
    channels = out_scale.numel()

    def col(t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return t.expand(channels, 1) if t.shape[0] == 1 else t

    codes = torch.arange(in_qmin, in_qmax + 1, dtype=torch.float64).unsqueeze(0)
    return lut_codes(fn, (codes - col(in_zp)) * col(in_scale), col(out_scale), col(out_zp), out_qmin, out_qmax)


def apply_channel_lut(q: torch.Tensor, table: torch.Tensor, in_qmin: int, axis: int) -> torch.Tensor:
    """Per-channel lookup ``table[j, q − in_qmin]`` for the elements of channel ``j`` along ``axis``.

    ``table`` is ``[C, levels]`` from :func:`build_channel_lut`, with ``C``
    the size of ``q`` along ``axis``. No arithmetic on values, so no rounding;
    codes outside the table raise ValueError.
    """
    q = _i64(q)
    channels, levels = table.shape
    if q.shape[axis] != channels:
        raise ValueError(f"table has {channels} channels, the tensor {q.shape[axis]} along axis {axis}")
    idx = q - in_qmin
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= levels):
        raise ValueError(f"codes outside the table's input range [{in_qmin}, {in_qmin + levels - 1}]")
    row = _bcast(torch.arange(channels, dtype=torch.int64, device=q.device), q, axis)
    return table.to(device=q.device, dtype=torch.int64).reshape(-1)[row * levels + idx]


# --- 4. softmax ------------------------------------------------------------------
def softmax_exp_table(in_scale: float, levels: int, frac_bits: int = 16) -> torch.Tensor:
    """Fixed-point ``exp`` table for :func:`int_softmax` (setup time, float64).

    ``table[i] = round_half_up(2^frac_bits · exp(in_scale·k))`` with
    ``k = i − (levels − 1)``, i.e. entries for ``k = −(levels−1) … 0`` in
    increasing order; the last entry is ``2^frac_bits``. Non-increasing toward
    the front; far entries may be 0 (the weight vanishes).
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    k = torch.arange(-(levels - 1), 1, dtype=torch.float64)
    return round_half_up(torch.exp(k * float(in_scale)) * float(1 << frac_bits)).to(torch.int64)


def _softmax_exp(q: torch.Tensor, in_scale: float, dim: int, frac_bits: int,
                 table: torch.Tensor | None) -> torch.Tensor:
    """``E = table[q − max(q)]`` along ``dim`` (the shared first half of both softmax kernels)."""
    q = _i64(q)
    d = q - q.amax(dim=dim, keepdim=True)  # <= 0
    span = -_min(d)
    if table is None:
        table = softmax_exp_table(in_scale, span + 1, frac_bits)
    levels = table.numel()
    if span > levels - 1:
        raise ValueError(f"softmax input spans {span + 1} codes, the exp table only {levels}")
    return table.to(device=q.device, dtype=torch.int64)[d + (levels - 1)]


def int_softmax(q: torch.Tensor, zero_point: int, in_scale: float, out_exp: int, out_qmax: int,
                dim: int = -1, frac_bits: int = 16, table: torch.Tensor | None = None) -> torch.Tensor:
    """Integer softmax along ``dim``; output codes at scale ``2^-out_exp``, zero point 0; int32 throughout.

    ``d = q − max(q)`` (the zero point cancels: ``zero_point`` is accepted
    only for a uniform signature), ``E = table[d]`` from
    :func:`softmax_exp_table` (built here from ``in_scale`` when ``table`` is
    None — pass a prebuilt table in the executor), ``S = ΣE``, one reciprocal
    per row ``R = ⌊(2^30 + ⌊S/2⌋) / S⌋`` (2^30/S rounded), and
    ``code = min(out_qmax, srr(E·R, 30 − out_exp))`` (round half up). ``S ≥ 2^frac_bits`` since the maximum
    contributes exactly ``2^frac_bits``, and ``E ≤ S`` gives ``E·R ≤ 2^30 + 2^(frac_bits − 1)``; before its
    rounding the code is within ``E·2^(out_exp − 31)`` (2^-7 for 16 fraction bits and ``out_exp`` 8) of
    ``E·2^out_exp/S``. Range: ``len·2^frac_bits < 2^31`` and ``0 ≤ out_exp < 30`` (checked).
    """
    if not 0 <= out_exp < SOFTMAX_RECIPROCAL_BITS:
        raise ValueError(f"out_exp must be in [0, {SOFTMAX_RECIPROCAL_BITS})")
    length = q.shape[dim]
    if length << frac_bits >= 1 << 31:
        raise OverflowError(f"int_softmax: a sum of {length} exp values of {frac_bits} fraction bits exceeds int32")
    e = _softmax_exp(q, in_scale, dim, frac_bits, table)
    s = e.sum(dim=dim, keepdim=True)
    r = ((1 << SOFTMAX_RECIPROCAL_BITS) + s // 2) // s
    return torch.clamp(shift_right_round(e * r, SOFTMAX_RECIPROCAL_BITS - out_exp), max=out_qmax)


def int_log2_softmax(q: torch.Tensor, zero_point: int, in_scale: float, bits: int, dim: int = -1,
                     frac_bits: int = 16, table: torch.Tensor | None = None) -> torch.Tensor:
    """FQ-ViT log-int-softmax codes along ``dim``: ``k ≈ round(log2(S / E))``, value ``2^-k``.

    ``E`` and ``S`` as in :func:`int_softmax`. The code is the smallest
    ``k ≥ 0`` with ``E·2^k·181 ≥ S·128`` (181/128 ≈ √2, so this rounds
    ``log2(S/E)`` half *down* at ``k + 1/2``, with the threshold ≈1e-4
    relative below √2), clamped to ``2^bits − 1``; the top code
    ``2^bits − 1`` means zero (``E = 0`` always gets it). Vectorised over
    ``k``: the code counts the ``k`` that fail the test (the test is
    monotone in ``k``), over at most ``bit_length(len·2^frac_bits) + 1``
    positions. Range: ``2·frac_bits + bit_length(len) ≤ 50`` (checked).
    """
    qmax = (1 << bits) - 1
    length = q.shape[dim]
    kmax = min(qmax, (length << frac_bits).bit_length() + 1)
    _guard(((SQRT2_NUM << frac_bits) << kmax) + (SQRT2_DEN * (length << frac_bits)), "int_log2_softmax")
    e = _softmax_exp(q, in_scale, dim, frac_bits, table)
    s_scaled = e.sum(dim=dim, keepdim=True) * SQRT2_DEN
    e_scaled = e * SQRT2_NUM
    code = torch.zeros_like(e)
    for k in range(kmax):
        code += ((e_scaled << k) < s_scaled).to(torch.int64)
    return torch.where(e == 0, torch.full_like(code, qmax), code.clamp(max=qmax))


# --- 5. layer norm ---------------------------------------------------------------
def bit_length(m: torch.Tensor) -> torch.Tensor:
    """Bits of each non-negative int64 value below 2^62 (0 for 0), by comparisons with powers of two."""
    m = _i64(m)
    return sum(((m >> k) > 0).to(torch.int64) for k in range(INT64_SAFE_BITS))


def norm_row_fits(count: int, in_bound: int, square_shift: int = 0) -> bool:
    """Whether a row of ``count`` centred, shifted values within ``±in_bound`` keeps :func:`int_layernorm`'s
    arithmetic in int32 with squares rounded down by ``square_shift`` bits: the row's sum of squares, at most
    ``L·(B² + 1)`` (over ``2^k``, plus half a step per value for the rounding), plus ``eps_q < 2^29`` below 2^31,
    and the sum of the values ``L·B`` too."""
    squares = count * (in_bound * in_bound + 1) >> square_shift
    if square_shift:
        squares += count // 2 + 1
    return squares + (1 << 29) < 1 << 31 and count * in_bound < 1 << 31


def layernorm_fits(channels: int, in_bound: int) -> bool:
    """Whether :func:`int_layernorm` keeps every intermediate in int32 for ``channels`` channels of centred,
    PTF-shifted input values within ``±in_bound``: :func:`norm_row_fits` (8-bit codes with PTF shifts up to 3:
    ``C ≤ 386``), and ``rem² < C²`` and the mean's fraction ``rem·R < C·46341`` must fit too (``C ≤ 46340``)."""
    return channels <= LN_MAX_ROW and norm_row_fits(channels, in_bound)


def groupnorm_shifts(count: int, in_bound: int) -> tuple[int, int]:
    """``(in_shift, square_shift)`` of a GroupNorm's centred inputs within ``±in_bound``, rows of ``count``
    values: a row that fits takes LayerNorm's headroom (:func:`layernorm_headroom`, the inputs shifted up) and
    exact squares; a longer one its inputs as they are and the smallest even ``square_shift`` that fits
    (:func:`norm_row_fits`). ValueError for rows no shift fits."""
    if count <= LN_MAX_ROW and norm_row_fits(count, in_bound):
        return layernorm_headroom(count, in_bound), 0
    for k in range(0, 31, 2):
        if norm_row_fits(count, in_bound, k):
            return 0, k
    raise ValueError(f"GroupNorm rows of {count} values within ±{in_bound} do not fit the int32 kernel")


def layernorm_headroom(channels: int, in_bound: int, limit: int = 12) -> int:
    """The largest left shift ``s ≤ limit`` of inputs within ``±in_bound`` that still :func:`layernorm_fits`:
    shifting the inputs up before the kernel makes the floor of ``rem²/C`` (an error below 1 in ``V``) small
    against ``V``, for rows of few channels or a small spread (0 when there is no room)."""
    s = 0
    while s < limit and layernorm_fits(channels, in_bound << (s + 1)):
        s += 1
    return s


def norm_extra_bits(count: int) -> int:
    """Fraction bits the normalised values of rows of ``count`` values carry beyond ``LN_FRAC_BITS``: 0 within
    :data:`LN_MAX_ROW`; past it ``⌊log2(L)/2⌋ − 4`` (the values' typical size falls as ``2^15/√L``, so long rows
    move bits from the gain ``gamma_q`` to them; ``|n·gamma_q|`` keeps its ``2^29`` bound)."""
    return max(0, (count.bit_length() - 1) // 2 - 4) if count > LN_MAX_ROW else 0


def fraction_shift(count: int) -> int:
    """For rows of ``count`` values: the shift ``t`` that brings ``count`` within :data:`LN_MAX_ROW` (0 for rows
    that are within it), by which the mean's remainder and the row length are divided for the mean's fraction."""
    t = 0
    while count >> t > LN_MAX_ROW:
        t += 1
    return t


def _normalise_rows(x: torch.Tensor, eps_q: int, square_shift: int = 0) -> torch.Tensor:
    """The normalised values ``n_j`` of :func:`int_layernorm`, each row the last dim of ``x`` (centred, shifted
    inputs already checked by :func:`norm_row_fits` for this ``square_shift``).

    Long rows (GroupNorm at ImageNet sizes) keep int32 two ways. Each square is rounded down by
    ``square_shift = k`` bits (even) before the sum, ``V = Σ srr(d², k) − srr(⌊rem²/L⌋, k) + srr(eps_q, k)``,
    and the reciprocal's numerator is ``2^(30 − k/2)`` in place of ``2^30``: the same ``n_j`` with the variance
    in steps of ``2^k`` squared codes. Past :data:`LN_MAX_ROW` values, where ``rem²`` and ``rem·R`` would leave
    int32, the mean's fraction takes ``rem`` and ``L`` shifted down by ``t`` (:func:`fraction_shift`),
    ``⌊((rem >> t)·R + ⌊(L >> t)/2⌋) / (L >> t)⌋``, and the ``⌊rem²/L⌋`` term (below one squared code per
    value) is 0, and the normalised values keep :func:`norm_extra_bits` more fraction bits (the final shift
    ``15 − p − E``, a left shift where negative). ``k = t = E = 0`` is LayerNorm's arithmetic exactly.
    """
    count = x.shape[-1]
    total = x.sum(dim=-1, keepdim=True)
    mean = torch.div(total, count, rounding_mode="floor")
    rem = total - mean * count
    d = x - mean
    k, t = int(square_shift), fraction_shift(count)
    correction = torch.div(rem * rem, count, rounding_mode="floor") if t == 0 else torch.zeros_like(rem)
    v = (shift_right_round(d * d, k).sum(dim=-1, keepdim=True) - shift_right_round(correction, k)
         + shift_right_round(torch.tensor(int(eps_q)), k))
    p = ((31 - bit_length(v)) // 2).clamp(max=LN_RECIPROCAL_BITS - LN_FRAC_BITS)
    w = v << (2 * p)
    root = isqrt(w)
    r = (root + (w - root * root > root).to(torch.int64)).clamp_min(1)
    recip = (1 << (LN_RECIPROCAL_BITS - k // 2)) // r
    frac = torch.div((rem >> t) * recip + (count >> t) // 2, count >> t, rounding_mode="floor")
    return shift_right_round(d * recip - frac, LN_RECIPROCAL_BITS - LN_FRAC_BITS - norm_extra_bits(count) - p)


def _norm_affine(n: torch.Tensor, gamma_q, beta_q, out_shift: int, out_zp, out_qmin: int, out_qmax: int
                 ) -> torch.Tensor:
    """``clamp(srr(n·gamma_q + beta_q, out_shift) + out_zp, out_qmin, out_qmax)`` (the constants broadcast)."""
    acc = n * _i64(torch.as_tensor(gamma_q)).to(n.device) + _i64(torch.as_tensor(beta_q)).to(n.device)
    if isinstance(out_zp, torch.Tensor):
        out_zp = _i64(out_zp).to(n.device)
    return torch.clamp(shift_right_round(acc, out_shift) + out_zp, out_qmin, out_qmax)


def int_layernorm(q: torch.Tensor, zero_point: torch.Tensor | int, ptf_shift: torch.Tensor | int,
                  gamma_q: torch.Tensor, beta_q: torch.Tensor, eps_q: int, out_shift: int,
                  out_zp: torch.Tensor | int, out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Integer LayerNorm over the last dim (``C`` channels) with PTF channel shifts; every intermediate in int32.

    Per row: ``x_j = (q_j − zp) << c_j`` (:func:`align`; ``c_j = ptf_shift[j]``), ``S = Σx``, the floor mean
    ``m = ⌊S / C⌋`` and ``rem = S − m·C`` (one division), ``d_j = x_j − m`` (the deviation from the exact
    mean is ``d_j − rem/C``), ``V = Σd² − ⌊rem²/C⌋ + eps_q`` (``≈ C·(var + eps)`` in squared codes), the
    largest ``p ≤ 15`` with ``V·4^p < 2^31``, ``W = V·4^p``, ``r = max(1, round(√W))`` (the floor root
    ``t``, plus one when ``W − t² > t``), one reciprocal ``R = ⌊2^30 / r⌋`` and the mean's fraction
    ``k = ⌊(rem·R + ⌊C/2⌋) / C⌋`` (one more division), then per element ``n_j = srr(d_j·R − k, 15 − p)``
    (≈ ``2^15·(x_j − mean) / √(C·(var + eps))``, ``|n_j| ≲ 2^15``) and ``code_j = clamp(srr(n_j·gamma_q_j +
    beta_q_j, out_shift) + out_zp, out_qmin, out_qmax)``. Rounding: round half up in the shifts and in
    ``√W``, floor in the divisions. Constants come from :func:`layernorm_constants`.

    Range: :func:`layernorm_fits` (checked on the actual values, OverflowError otherwise) keeps ``V`` below
    2^31; ``|d_j| ≤ √V + 1`` and ``√W ≥ 2^14.5`` (for ``V ≥ 2``) keep ``|d_j·R| ≤ 2^30 + 2^16``;
    ``|gamma_q| < 2^14`` and ``|beta_q| ≤ 2^30`` keep the affine step below 2^31.
    """
    q = _i64(q)
    channels = q.shape[-1]
    x = align(q, zero_point, ptf_shift, 0, axis=-1)
    if not layernorm_fits(channels, _absmax(x)):
        raise OverflowError(f"int_layernorm: {channels} channels of values up to {_absmax(x)} exceed int32")
    return _norm_affine(_normalise_rows(x, eps_q), gamma_q, beta_q, out_shift, out_zp, out_qmin, out_qmax)


def int_groupnorm(q: torch.Tensor, groups: int, zero_point: int, in_shift: int, gamma_q: torch.Tensor,
                  beta_q: torch.Tensor, eps_q: int, out_shift: int, out_zp: int, out_qmin: int,
                  out_qmax: int, square_shift: int = 0) -> torch.Tensor:
    """Integer GroupNorm of ``q`` ``[B, C, *spatial]``: :func:`int_layernorm`'s arithmetic with each row one
    group of ``C / groups`` channels and every position (``L`` elements), and the affine per channel.

    ``x = (q − zp) << in_shift``, then ``n`` per row as in :func:`int_layernorm` with ``L`` in place of ``C``
    (rows too long for exact int32 sums: the squares rounded down by ``square_shift`` bits and, past
    :data:`LN_MAX_ROW` values, the mean's fraction from shifted-down remainders; :func:`_normalise_rows`, shifts
    from :func:`groupnorm_shifts`),
    and ``code = clamp(srr(n·gamma_q[c] + beta_q[c], out_shift) + out_zp, out_qmin, out_qmax)`` for an element of
    channel ``c``. Constants: :func:`layernorm_constants` with ``count = L``. Range: :func:`norm_row_fits` of
    ``L`` elements (OverflowError otherwise).
    """
    q = _i64(q)
    b, c = q.shape[:2]
    x = align(q, zero_point, in_shift, 0).reshape(b, groups, -1)  # [B, C, *S] -> [B, G, L]
    count = x.shape[-1]
    if not norm_row_fits(count, _absmax(x), square_shift):
        raise OverflowError(f"int_groupnorm: rows of {count} values up to {_absmax(x)} exceed int32")
    n = _normalise_rows(x, eps_q, square_shift).reshape(b, c, -1)  # [B, G, L] -> [B, C, prod(S)]
    codes = _norm_affine(n, _i64(torch.as_tensor(gamma_q)).reshape(c, 1), _i64(torch.as_tensor(beta_q)).reshape(c, 1),
                         out_shift, out_zp, out_qmin, out_qmax)
    return codes.reshape(q.shape)


def layernorm_constants(gamma: torch.Tensor, beta: torch.Tensor, eps: float, in_scale: float, channels: int,
                        out_scale: torch.Tensor | float, out_qmin: int, out_qmax: int,
                        out_zp: torch.Tensor | int, count: int | None = None) -> dict[str, torch.Tensor | int]:
    """Integer constants of :func:`int_layernorm` (setup time, float64): ``gamma_q``, ``beta_q``, ``eps_q``,
    ``out_shift``.

    The kernel then approximates ``layer_norm(x)·gamma + beta`` for input ``x = (q − zp)·2^c_j·in_scale``
    (``in_scale`` the base scale; the PTF factors ``2^c_j`` go in ``ptf_shift``) and output codes at
    ``out_scale`` (a float, or per-channel ``[C]`` to fold a following per-channel division). ``count``: the
    values normalised together, where they are not the ``C`` channels (a GroupNorm's rows, :func:`int_groupnorm`:
    ``C`` below then means ``count``, while gamma and beta keep one entry per channel).

    * ``eps_q = round(C·eps / in_scale²)``, capped at ``2^29 − 1`` (an epsilon that large already holds
      every normalised value below ``2^-14.5·√C·max|x|``).
    * ``g_j = √C·gamma_j / out_scale_j`` (the kernel's normalised value is divided by √C);
      ``gamma_q_j = round(g_j·2^e)`` with the largest ``e`` such that ``|gamma_q| ≤ 2^14 − 1`` and
      ``out_shift = 15 + e`` leaves ``Q·2^out_shift ≤ 2^29``, ``Q`` one more than the widest output code
      distance from the zero point; ``beta_q_j = round(beta_j / out_scale_j · 2^out_shift)`` clamped to
      ``±(2^29 + Q·2^out_shift)`` — past that bound the output saturates either way, so the clamp changes no
      code.

    Rounding half up throughout. Raises ValueError when ``gamma`` needs ``out_shift < 0``.
    """
    count = channels if count is None else count
    os_ = torch.as_tensor(out_scale, dtype=torch.float64)
    g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1) * math.sqrt(count) / os_
    bt = torch.as_tensor(beta, dtype=torch.float64).reshape(-1) / os_
    if g.numel() != channels or bt.numel() != channels:
        raise ValueError(f"gamma/beta must have {channels} entries")
    zp = _absmax(out_zp if isinstance(out_zp, torch.Tensor) else int(out_zp))
    span = max(abs(out_qmax) + zp, abs(out_qmin) + zp) + 1
    extra = norm_extra_bits(count)  # n carries that many more bits, gamma_q that many fewer
    limit = (1 << (LN_FRAC_BITS - 1 - extra)) - 1
    e = 29 - span.bit_length() - LN_FRAC_BITS - extra  # Q·2^out_shift ≤ 2^29
    gmax = float(g.abs().max())
    while gmax > 0 and float(round_half_up(torch.tensor(gmax * 2.0**e, dtype=torch.float64))) > limit:
        e -= 1
    out_shift = LN_FRAC_BITS + extra + e
    if out_shift < 0:
        raise ValueError(f"LayerNorm gain {gmax:.3g} (in output codes) is too large for the integer kernel")
    bound = (1 << 29) + (span << out_shift)
    eps_q = float(round_half_up(torch.tensor(count * float(eps) / float(in_scale) ** 2, dtype=torch.float64)))
    return {"gamma_q": round_half_up(g * 2.0**e).to(torch.int64),
            "beta_q": round_half_up(bt * 2.0**out_shift).clamp(-bound, bound).to(torch.int64),
            "eps_q": int(min(eps_q, (1 << 29) - 1)), "out_shift": out_shift}


# --- 7. bilinear upsampling -------------------------------------------------------------
def bilinear_taps(size: int, factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices and integer weights of each of ``size·factor`` outputs along one dim of a bilinear
    upsampling by an integer ``factor`` (``align_corners=False``, torch's and ONNX's half-pixel rule).

    Output ``i`` reads source position ``(i + 1/2)/factor − 1/2``, clamped at 0: in units of ``1/(2·factor)``
    that is ``p = max(0, 2i + 1 − factor)``; ``i0 = p // (2·factor)``, ``i1 = min(i0 + 1, size − 1)``, and
    the weights ``w1 = p mod 2·factor``, ``w0 = 2·factor − w1`` sum to ``2·factor`` exactly.
    """
    i = torch.arange(size * factor, dtype=torch.int64)
    p = (2 * i + 1 - factor).clamp_min(0)
    i0 = p // (2 * factor)
    w1 = p - i0 * 2 * factor
    return i0, (i0 + 1).clamp_max(size - 1), 2 * factor - w1, w1


def int_upsample_bilinear(x: torch.Tensor, factor_h: int, factor_w: int) -> torch.Tensor:
    """Bilinear upsampling of integer ``x`` ``[..., H, W]`` by integer factors, exactly: the result is
    ``(2·factor_h)·(2·factor_w)`` times the float upsampling (:func:`bilinear_taps` along each dim)."""
    x = _i64(x)
    h0, h1, a0, a1 = bilinear_taps(x.shape[-2], factor_h)
    w0, w1, b0, b1 = bilinear_taps(x.shape[-1], factor_w)
    rows = x[..., h0, :] * a0.reshape(-1, 1) + x[..., h1, :] * a1.reshape(-1, 1)  # [..., H·fh, W]
    return rows[..., w0] * b0 + rows[..., w1] * b1

"""Integer kernels: bit-exact against Python-int references, accurate against float."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hybridquant.primitives import (
    is_two_term,
    log2_fake_quantize,
    qrange,
    quantize,
    round_half_up,
    two_term_round,
)
from hybridquant.primitives.arith import (
    LN_MAX_ROW,
    align,
    apply_channel_lut,
    apply_lut,
    build_channel_lut,
    build_lut,
    div_round_half_up,
    groupnorm_shifts,
    int_groupnorm,
    int_layernorm,
    int_log2_softmax,
    int_softmax,
    isqrt,
    layernorm_constants,
    layernorm_fits,
    layernorm_headroom,
    lut_codes,
    multiplier_to_shifts,
    requantize,
    requantize_thresholds,
    requantize_two_term,
    softmax_exp_table,
)

INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 1]))
FAST = settings(max_examples=60, deadline=None)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# --- Python-int references ---------------------------------------------------------
def ref_round(x: Fraction) -> int:
    """Round half up of an exact rational."""
    return math.floor(x + Fraction(1, 2))


def ref_clamp(v: int, lo: int, hi: int) -> int:
    return min(max(v, lo), hi)


def ref_exp_table(in_scale: float, levels: int, frac_bits: int) -> list[int]:
    return [math.floor(math.exp(in_scale * k) * 2**frac_bits + 0.5) for k in range(-(levels - 1), 1)]


def ref_softmax_row(row: list[int], table: list[int], out_exp: int, out_qmax: int) -> list[int]:
    m, levels = max(row), len(table)
    e = [table[v - m + levels - 1] for v in row]
    s = sum(e)
    r = (2**30 + s // 2) // s
    assert s < 2**31 and all(ei * r <= 2**30 + 2**15 for ei in e)  # int32 throughout
    return [min(out_qmax, ref_round(Fraction(ei * r, 2 ** (30 - out_exp)))) for ei in e]


def ref_log2_row(row: list[int], table: list[int], bits: int) -> list[int]:
    m, levels, qmax = max(row), len(table), (1 << bits) - 1
    e = [table[v - m + levels - 1] for v in row]
    s = sum(e)
    out = []
    for ei in e:
        k = 0
        while k < qmax and not ei * 2**k * 181 >= s * 128:
            k += 1
        out.append(qmax if ei == 0 else k)
    return out


def ref_srr(v: int, k: int) -> int:
    return ref_round(Fraction(v, 2**k)) if k > 0 else v * 2**-k


def ref_layernorm_row(row, zp, shifts, k, out_zp, lo, hi):
    """The contract in Python ints; also returns the largest magnitude of any intermediate."""
    x = [(v - zp) << c for v, c in zip(row, shifts, strict=True)]
    c_n = len(x)
    total = sum(x)
    mean, rem = total // c_n, total % c_n
    d = [v - mean for v in x]
    var = sum(v * v for v in d) - rem * rem // c_n + k["eps_q"]
    p = min(15, (31 - var.bit_length()) // 2)
    w = var << 2 * p
    t = math.isqrt(w)
    r = max(1, t + 1 if w - t * t > t else t)
    rec = 2**30 // r
    frac = (rem * rec + c_n // 2) // c_n
    products = [v * rec - frac for v in d]
    n = [ref_srr(v, 15 - p) for v in products]
    affine = [v * g + b for v, g, b in zip(n, k["gamma_q"].tolist(), k["beta_q"].tolist(), strict=True)]
    out = [ref_clamp(ref_srr(a, k["out_shift"]) + out_zp, lo, hi) for a in affine]
    widest = max(abs(v) for v in [*x, total, *d, sum(v * v for v in d), var, w, rec, rem * rec + c_n, *products,
                                  *n, *[abs(a) + 2 ** max(k["out_shift"] - 1, 0) for a in affine]])
    return out, widest


# --- 1. requantization -------------------------------------------------------------
@FAST
@given(st.lists(INT32, min_size=1, max_size=16), st.integers(0, 31), st.integers(-10, 10), st.integers(2, 16),
       st.booleans())
def test_requantize_matches_reference(acc, shift, zp, bits, signed):
    lo, hi = qrange(bits, signed)
    got = requantize(t64(acc), shift, zp, lo, hi)
    want = [ref_clamp(ref_round(Fraction(a, 2**shift)) + zp, lo, hi) for a in acc]
    assert got.tolist() == want


@FAST
@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=8), st.integers(-8, 0))
def test_requantize_negative_shift_is_exact_left_shift(acc, shift):
    got = requantize(t64(acc), shift, 0, -(2**40), 2**40)
    assert got.tolist() == [a << -shift for a in acc]


def test_requantize_ties_and_saturation():
    acc = t64([-5, -3, -1, 1, 3, 5, 2**31 - 1, -(2**31)])  # /2: ties at every odd value
    assert requantize(acc, 1, 0, -128, 127).tolist() == [-2, -1, 0, 1, 2, 3, 127, -128]
    assert requantize(acc, 1, 3, 0, 255).tolist() == [1, 2, 3, 4, 5, 6, 255, 0]


def test_requantize_per_channel_axis():
    acc = torch.arange(-12, 12, dtype=torch.int64).reshape(2, 3, 4) * 37
    shift, zp = t64([0, 2, 5]), t64([1, -2, 0])
    got = requantize(acc, shift, zp, -128, 127, axis=1)
    for c in range(3):
        want = [ref_clamp(ref_round(Fraction(a, 2 ** int(shift[c]))) + int(zp[c]), -128, 127)
                for a in acc[:, c].flatten().tolist()]
        assert got[:, c].flatten().tolist() == want


@FAST
@given(st.lists(INT32, min_size=1, max_size=16), st.integers(-12, 20), st.integers(1, 12), st.sampled_from([-1, 0, 1]),
       st.integers(-6, 40))
def test_requantize_two_term_matches_exact_product(acc, a, gap, sign, n):
    b = a - gap
    m = (Fraction(2) ** a + sign * Fraction(2) ** b) / Fraction(2) ** n
    assume(max(a, b, 0) + max(0, -n) + max(0, -min(a, b)) <= 29)
    got = requantize_two_term(t64(acc), a, b, sign, n, 0, -(2**62), 2**62)
    assert got.tolist() == [ref_round(x * m) for x in acc]


def test_requantize_two_term_per_channel_and_saturation():
    acc = t64([[1000, -1000, 77], [5, -5, 2**31 - 1]])
    a, b, sign, n = t64([3, -2]), t64([1, -4]), t64([-1, 1]), t64([4, 0])  # M = 6/16, (1/4 + 1/16)
    got = requantize_two_term(acc, a, b, sign, n, t64([0, 10]), -128, 127, axis=0)
    ms = [Fraction(6, 16), Fraction(5, 16)]
    want = [[ref_clamp(ref_round(x * ms[r]) + [0, 10][r], -128, 127) for x in acc[r].tolist()] for r in range(2)]
    assert got.tolist() == want


@FAST
@given(st.lists(INT32, min_size=1, max_size=16), st.integers(-12, 20), st.integers(1, 12), st.sampled_from([-1, 0, 1]),
       st.integers(-6, 40), st.lists(st.integers(-(2**20), 2**20), max_size=12, unique=True))
def test_requantize_thresholds_counts_thresholds_at_or_below_the_exact_product(acc, a, gap, sign, n, thresholds):
    b = a - gap
    m = (Fraction(2) ** a + sign * Fraction(2) ** b) / Fraction(2) ** n
    assume(max(a, b, 0) + max(0, -n) + max(0, -min(a, b)) <= 29)
    thresholds = sorted(thresholds)
    got = requantize_thresholds(t64(acc), a, b, sign, n, t64(thresholds))
    # no rounding anywhere: a value exactly on a threshold belongs to the code above it
    assert got.tolist() == [sum(1 for t in thresholds if x * m >= t) for x in acc]


def test_requantize_thresholds_per_channel_ties_and_negatives():
    acc = t64([[-9, -8, -7, 7, 8], [-9, -8, -7, 7, 8]])
    # channel 0: M = 1/4 (floor(-9/4) = -3, floor(-7/4) = -2); channel 1: M = 2
    got = requantize_thresholds(acc, t64([0, 1]), t64([0, 0]), t64([0, 0]), t64([2, 0]), t64([-2, 0, 2]), axis=0)
    assert got.tolist() == [[0, 1, 1, 2, 3], [0, 0, 0, 3, 3]]
    with pytest.raises(OverflowError):
        requantize_thresholds(t64([2**40]), 25, 0, 0, 0, t64([0]))


def test_lut_codes_per_channel_broadcast_is_the_channel_table():
    values = torch.linspace(-3, 3, 9, dtype=torch.float64).unsqueeze(0)
    out_scale = torch.tensor([[0.25], [0.125]], dtype=torch.float64)
    table = lut_codes(F.silu, values, out_scale, 3, 0, 63)
    for j in range(2):
        assert torch.equal(table[j], lut_codes(F.silu, values[0], float(out_scale[j]), 3, 0, 63))


def test_requantize_overflow_is_refused():
    with pytest.raises(OverflowError):
        requantize(t64([2**40]), -30, 0, -128, 127)
    with pytest.raises(OverflowError):
        requantize_two_term(t64([2**31]), 40, 0, 1, 0, 0, -128, 127)


@FAST
@given(st.integers(-40, 40), st.integers(1, 20), st.sampled_from([-1, 0, 1]))
def test_multiplier_to_shifts_round_trip(e, gap, sign):
    m = 2.0**e + sign * 2.0 ** (e - gap)
    a, b, s, n = multiplier_to_shifts(m, 2)
    assert min(a, b, n) >= 0 and s in (-1, 0, 1)
    assert (Fraction(2) ** a + s * Fraction(2) ** b) / Fraction(2) ** n == Fraction(m)
    if sign == 0:
        assert multiplier_to_shifts(m, 1) == (a, b, s, n) and s == 0
    elif not (sign == -1 and gap == 1):  # 2^e − 2^(e−1) is a power of two
        with pytest.raises(ValueError):
            multiplier_to_shifts(m, 1)


@FAST
@given(st.floats(1e-6, 1e6))
def test_multiplier_to_shifts_accepts_exactly_two_term_values(x):
    if is_two_term(x):
        a, b, s, n = multiplier_to_shifts(x, 2)
        assert (Fraction(2) ** a + s * Fraction(2) ** b) / Fraction(2) ** n == Fraction(x)
    else:
        with pytest.raises(ValueError):
            multiplier_to_shifts(x, 2)
    # the two-term rounding of any scale decomposes
    a, b, s, n = multiplier_to_shifts(float(two_term_round(torch.tensor(x))), 2)
    assert min(a, b, n) >= 0


@pytest.mark.parametrize("bad", [0.0, -1.0, -0.5, float("nan"), float("inf"), 0.3, 2**3 + 2**1 + 2**-1])
def test_multiplier_to_shifts_rejects(bad):
    with pytest.raises(ValueError):
        multiplier_to_shifts(bad, 2)
    with pytest.raises(ValueError):
        multiplier_to_shifts(1.0, 3)


# --- 2. align ----------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(-(2**15), 2**16 - 1), min_size=1, max_size=16), st.integers(-200, 200),
       st.integers(-20, 10), st.integers(0, 12))
def test_align_is_exact(q, zp, exp_to, gap):
    got = align(t64(q), zp, exp_to + gap, exp_to)
    assert got.tolist() == [(v - zp) * 2**gap for v in q]
    # same real values on both grids
    assert all(Fraction(g) * Fraction(2) ** exp_to == Fraction(v - zp) * Fraction(2) ** (exp_to + gap)
               for g, v in zip(got.tolist(), q, strict=True))


def test_align_per_channel_and_refuses_coarsening():
    q = t64([[3, 4, 5], [0, 1, 2]])
    assert align(q, t64([1, 1, 1]), t64([0, 1, 3]), 0, axis=1).tolist() == [[2, 6, 32], [-1, 0, 8]]
    with pytest.raises(ValueError):
        align(q, 0, -3, -2)


# --- isqrt -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=32))
def test_isqrt_is_exact_floor(values):
    got = isqrt(t64(values))
    assert got.tolist() == [math.isqrt(v) for v in values]


@FAST
@given(st.lists(st.integers(0, 3037000499), min_size=1, max_size=32))
def test_isqrt_perfect_squares_and_neighbours(roots):
    vals, want = [], []
    for r in roots:
        for v in (r * r - 1, r * r, r * r + 1, (r + 1) ** 2 - 1):
            if 0 <= v < 2**63:
                vals.append(v)
                want.append(math.isqrt(v))
    got = isqrt(t64(vals))
    assert got.tolist() == want
    r = got
    v = t64(vals)
    assert bool((r * r <= v).all()) and bool((r + 1 > torch.div(v, r + 1, rounding_mode="floor")).all())


def test_isqrt_extremes_and_negative():
    vals = [0, 1, 2, 3, 4, 2**62 - 1, 2**62, 2**63 - 1, 3037000499**2, 3037000499**2 - 1]
    assert isqrt(t64(vals)).tolist() == [math.isqrt(v) for v in vals]
    with pytest.raises(ValueError):
        isqrt(t64([4, -1]))


def test_div_round_half_up():
    num, den = t64([-7, -6, -5, -3, -1, 0, 1, 3, 5, 7]), t64([2, 4, 2, 2, 2, 3, 2, 6, 2, 14])
    assert div_round_half_up(num, den).tolist() == [ref_round(Fraction(a, b)) for a, b in
                                                   zip(num.tolist(), den.tolist(), strict=True)]


# --- 3. lookup tables --------------------------------------------------------------
@pytest.mark.parametrize("fn", [F.silu, F.gelu, torch.sigmoid], ids=["silu", "gelu", "sigmoid"])
@pytest.mark.parametrize("in_bits,in_signed,in_zp,in_scale", [(8, True, 0, 0.05), (8, False, 117, 2**-5),
                                                             (16, True, 3, 1e-3)])
def test_lut_equals_fake_quantized_function(fn, in_bits, in_signed, in_zp, in_scale):
    in_lo, in_hi = qrange(in_bits, in_signed)
    out_lo, out_hi = qrange(8, False)
    out_scale, out_zp = 0.03, 20
    table = build_lut(fn, in_scale, in_zp, in_lo, in_hi, out_scale, out_zp, out_lo, out_hi)
    codes = torch.arange(in_lo, in_hi + 1, dtype=torch.int64)
    x = ((codes - in_zp).double() * in_scale).float()  # dequantize; fn runs in float32 like the simulation
    want = quantize(fn(x).double(), out_scale, out_zp, out_lo, out_hi).to(torch.int64)
    assert torch.equal(table, want)
    assert torch.equal(apply_lut(codes, table, in_lo), want)
    q = torch.randint(in_lo, in_hi + 1, (5, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_lut(q, table, in_lo), want[q - in_lo])
    with pytest.raises(ValueError):
        apply_lut(t64([in_lo - 1]), table, in_lo)


def test_channel_lut_matches_per_channel_tables():
    alpha = torch.tensor([1.0, 2.0, 0.5, 4.0])
    out_scale = 0.02 * alpha
    table = build_channel_lut(F.silu, 0.04, 5, -128, 127, out_scale, 0, -128, 127)
    assert table.shape == (4, 256)
    for j in range(4):
        assert torch.equal(table[j], build_lut(F.silu, 0.04, 5, -128, 127, float(out_scale[j]), 0, -128, 127))
    q = torch.randint(-128, 128, (2, 4, 3, 3), generator=torch.Generator().manual_seed(1))
    got = apply_channel_lut(q, table, -128, axis=1)
    for j in range(4):
        assert torch.equal(got[:, j], table[j][q[:, j] + 128])
    # the table is the fake-quantized y / alpha_j
    x = (q.double() - 5) * 0.04
    want = quantize(F.silu(x) / alpha.double().reshape(1, 4, 1, 1), 0.02, 0, -128, 127).to(torch.int64)
    assert torch.equal(got, want)
    with pytest.raises(ValueError):
        apply_channel_lut(q, table, -128, axis=2)


# --- 4. softmax --------------------------------------------------------------------
def test_softmax_exp_table():
    table = softmax_exp_table(0.1, 256, 16)
    assert table.tolist() == ref_exp_table(0.1, 256, 16)
    assert int(table[-1]) == 2**16 and bool((table[1:] >= table[:-1]).all())


@FAST
@given(st.lists(st.lists(st.integers(-128, 127), min_size=6, max_size=6), min_size=1, max_size=4),
       st.sampled_from([0.01, 0.07, 0.25, 1.0]), st.integers(0, 16), st.integers(8, 20))
def test_int_softmax_matches_reference(rows, in_scale, out_exp, frac):
    table = softmax_exp_table(in_scale, 256, frac)
    got = int_softmax(t64(rows), 0, in_scale, out_exp, 2**out_exp - 1, frac_bits=frac, table=table)
    ref_table = table.tolist()
    assert got.tolist() == [ref_softmax_row(r, ref_table, out_exp, 2**out_exp - 1) for r in rows]
    # the table built on the fly from in_scale gives the same codes
    assert torch.equal(int_softmax(t64(rows), 0, in_scale, out_exp, 2**out_exp - 1, frac_bits=frac), got)


@FAST
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=40), st.sampled_from([0.02, 0.1, 0.5]),
       st.integers(4, 12))
def test_int_softmax_properties(row, in_scale, out_exp):
    q = t64(row)
    out = int_softmax(q, 7, in_scale, out_exp, 2**out_exp)  # no clamping: out_qmax = 2^out_exp
    # sum: each code is within 1/2 + E_i·2^(out_exp - 30) of E_i·2^out_exp/S, and those sum to 2^out_exp exactly
    assert abs(int(out.sum()) - 2**out_exp) <= len(row) / 2 + 2 ** (out_exp + 16 - 30) * len(row)
    # monotone: a larger input never gets a smaller output; equal inputs, equal outputs
    order = torch.argsort(q, stable=True)
    assert bool((out[order][1:] >= out[order][:-1]).all())
    for v in set(row):
        assert len(set(out[q == v].tolist())) == 1
    # shift invariance: the zero point and a common offset cancel
    assert torch.equal(int_softmax(q - 3, 0, in_scale, out_exp, 2**out_exp), out)


@pytest.mark.parametrize("in_scale", [0.02, 0.08, 0.3])
def test_int_softmax_within_one_lsb_of_float(in_scale):
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-128, 128, (64, 49), generator=gen)
    out_exp, out_qmax = 8, 255
    got = int_softmax(q, 0, in_scale, out_exp, out_qmax)
    p = torch.softmax(q.double() * in_scale, dim=-1)
    want = torch.clamp(round_half_up(p * 2**out_exp), 0, out_qmax).to(torch.int64)
    diff = (got - want).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.01


def test_int_softmax_other_dim_and_table_range():
    q = torch.randint(-128, 128, (3, 5, 4), generator=torch.Generator().manual_seed(3))
    got = int_softmax(q, 0, 0.1, 8, 255, dim=1)
    assert torch.equal(got, int_softmax(q.transpose(1, 2), 0, 0.1, 8, 255).transpose(1, 2))
    with pytest.raises(ValueError):
        int_softmax(t64([0, 100]), 0, 0.1, 8, 255, table=softmax_exp_table(0.1, 16))


@FAST
@given(st.lists(st.lists(st.integers(-128, 127), min_size=5, max_size=5), min_size=1, max_size=4),
       st.sampled_from([0.01, 0.07, 0.25, 1.0]), st.integers(1, 6))
def test_int_log2_softmax_matches_reference(rows, in_scale, bits):
    table = softmax_exp_table(in_scale, 256, 16)
    got = int_log2_softmax(t64(rows), 0, in_scale, bits, table=table)
    assert got.tolist() == [ref_log2_row(r, table.tolist(), bits) for r in rows]


@FAST
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=40), st.sampled_from([0.02, 0.1, 0.5]))
def test_int_log2_softmax_properties(row, in_scale):
    bits, q = 4, t64(row)
    out = int_log2_softmax(q, 0, in_scale, bits)
    assert int(out.min()) >= 0 and int(out.max()) <= 15
    order = torch.argsort(q, stable=True)
    assert bool((out[order][1:] <= out[order][:-1]).all())  # larger input, smaller code (larger value)
    for v in set(row):
        assert len(set(out[q == v].tolist())) == 1
    # the codes are round(log2(S/E)) except within 1e-4 of a rounding boundary (181/128 vs sqrt 2)
    table = softmax_exp_table(in_scale, 256, 16)
    e = table[q - q.max() + 255]
    s = int(e.sum())
    for ei, k in zip(e.tolist(), out.tolist(), strict=True):
        if ei == 0:
            assert k == 15
            continue
        lg = math.log2(s / ei)
        if abs(lg - round(lg) - 0.5) > 1e-3 and abs(lg - round(lg) + 0.5) > 1e-3:
            assert k == min(15, math.floor(lg + 0.5))


def test_int_log2_softmax_close_to_float_log2_quantizer():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 128, (64, 49), generator=gen)
    for in_scale in (0.02, 0.08, 0.3):
        got = int_log2_softmax(q, 0, in_scale, 4)
        p = torch.softmax(q.double() * in_scale, dim=-1)
        fq = log2_fake_quantize(p, 4)
        want = torch.where(fq > 0, -torch.log2(fq.clamp_min(1e-30)), torch.full_like(fq, 15.0)).to(torch.int64)
        diff = (got - want).abs()
        assert int(diff.max()) <= 1
        assert float((diff > 0).double().mean()) < 0.01


# --- 5. layer norm -----------------------------------------------------------------
def _ln_case(seed: int, tokens: int, channels: int, ptf: bool, bits: int = 8):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = qrange(bits, signed=False)
    zp = (hi + 1) // 2 + int(torch.randint(-20, 20, (1,), generator=gen))
    spread = torch.randint(2, (hi + 1) // 4, (tokens, 1), generator=gen).double()
    centre = torch.randint(-30, 30, (tokens, 1), generator=gen).double()
    q = torch.clamp(round_half_up(zp + centre + spread * torch.randn(tokens, channels, generator=gen, dtype=torch.float64)),
                    lo, hi).to(torch.int64)
    shifts = torch.randint(0, 4, (channels,), generator=gen) if ptf else torch.zeros(channels, dtype=torch.int64)
    gamma = 1 + 0.3 * torch.randn(channels, generator=gen)
    beta = 0.2 * torch.randn(channels, generator=gen)
    return q, zp, shifts, gamma, beta


@pytest.mark.parametrize("ptf", [False, True], ids=["no_ptf", "ptf"])
def test_int_layernorm_matches_reference(ptf):
    q, zp, shifts, gamma, beta = _ln_case(5, 3, 12, ptf)
    k = layernorm_constants(gamma, beta, 1e-5, 0.02, 12, 2**-4, -128, 127, 3)
    got = int_layernorm(q, zp, shifts, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 3, -128, 127)
    assert got.tolist() == [ref_layernorm_row(r, zp, shifts.tolist(), k, 3, -128, 127)[0] for r in q.tolist()]


@FAST
@given(st.integers(1, 386), st.integers(0, 3), st.sampled_from([4, 6, 8]), st.booleans(),
       st.sampled_from([1e-12, 1e-5, 1e-2, 10.0]), st.sampled_from([2**-12, 2**-6, 0.5, 8.0]),
       st.sampled_from([2**-8, 2**-4, 1.0]), st.sampled_from([0.0, 0.01, 1.0, 100.0]), st.integers(0, 2**32 - 1))
def test_int_layernorm_every_intermediate_fits_int32(channels, ptf, bits, signed, eps, in_scale, out_scale,
                                                     gain, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = qrange(bits, signed)
    q = torch.randint(lo, hi + 1, (4, channels), generator=gen)
    q[1] = q[1, :1]  # a constant row
    q[2] = lo  # one value apart from the rest
    q[2, 0] = lo + 1
    q[3] = torch.where(torch.arange(channels) % 2 == 0, lo, hi)  # the widest spread
    zp = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    shifts = torch.randint(0, ptf + 1, (channels,), generator=gen)
    gamma = gain * torch.randn(channels, generator=gen, dtype=torch.float64)
    beta = gain * torch.randn(channels, generator=gen, dtype=torch.float64)
    k = layernorm_constants(gamma, beta, eps, in_scale, channels, out_scale, -128, 127, 0)
    got = int_layernorm(q, zp, shifts, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127)
    for row, out in zip(q.tolist(), got.tolist(), strict=True):
        want, widest = ref_layernorm_row(row, zp, shifts.tolist(), k, 0, -128, 127)
        assert out == want and widest < 2**31
    assert k["eps_q"] < 2**29 and int(k["gamma_q"].abs().max()) < 2**14 and int(k["beta_q"].abs().max()) <= 2**30


@pytest.mark.parametrize("ptf", [False, True], ids=["no_ptf", "ptf"])
@pytest.mark.parametrize("bits,channels", [(8, 96), (6, 64), (8, 240)])
def test_int_layernorm_within_one_lsb_of_float(ptf, bits, channels):
    q, zp, shifts, gamma, beta = _ln_case(6, 128, channels, ptf, bits)
    in_scale, out_scale, eps = 0.01, 2**-4, 1e-5
    k = layernorm_constants(gamma, beta, eps, in_scale, channels, out_scale, -128, 127, 0)
    got = int_layernorm(q, zp, shifts, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127)
    x = (q - zp).double() * (2.0 ** shifts.double()) * in_scale
    y = F.layer_norm(x, (channels,), gamma.double(), beta.double(), eps)
    want = quantize(y, out_scale, 0, -128, 127).to(torch.int64)
    diff = (got - want).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.02


def test_int_layernorm_per_channel_out_scale_and_constant_rows():
    channels = 8
    gamma, beta = torch.linspace(0.5, 1.5, channels), torch.linspace(-0.3, 0.3, channels)
    alpha = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.0, 1.0, 8.0, 1.0])
    k = layernorm_constants(gamma, beta, 1e-5, 0.05, channels, 2**-5 * alpha, -128, 127, 0)
    q = torch.stack([torch.full((channels,), 100), torch.arange(channels) * 9]).to(torch.int64)
    got = int_layernorm(q, 128, 0, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127)
    y = F.layer_norm((q - 128).double() * 0.05, (channels,), gamma.double(), beta.double(), 1e-5)
    want = quantize(y / alpha.double(), 2**-5, 0, -128, 127).to(torch.int64)
    assert int((got - want).abs().max()) <= 1
    # a constant row normalises to beta exactly (every z is 0)
    assert torch.equal(got[0], quantize(beta.double() / alpha.double(), 2**-5, 0, -128, 127).to(torch.int64))


# --- 6. group norm ------------------------------------------------------------------
def _gn_case(seed: int, shape: tuple[int, ...]):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, generator=gen)
    q[0, : shape[1] // 2] //= 4  # unequal groups: a narrow half of channels
    gamma = 1 + 0.3 * torch.randn(shape[1], generator=gen, dtype=torch.float64)
    beta = 0.2 * torch.randn(shape[1], generator=gen, dtype=torch.float64)
    return q, gamma, beta


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_int_groupnorm_is_int_layernorm_over_each_group(groups):
    """A group's rows through int_layernorm, its affine repeated along the positions, give the same codes."""
    b, c, h, w = 2, 8, 3, 5
    q, gamma, beta = _gn_case(1, (b, c, h, w))
    count = c // groups * h * w
    k = layernorm_constants(gamma, beta, 1e-5, 0.02, c, 2**-4, -128, 127, 2, count=count)
    got = int_groupnorm(q, groups, 131, 2, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 2, -128, 127)
    rows = q.reshape(b * groups, count)
    repeat = (k["gamma_q"].repeat_interleave(h * w).reshape(groups, count),
              k["beta_q"].repeat_interleave(h * w).reshape(groups, count))
    want = torch.stack([int_layernorm(rows[r], 131, 2, repeat[0][r % groups], repeat[1][r % groups], k["eps_q"],
                                      k["out_shift"], 2, -128, 127) for r in range(b * groups)])
    assert torch.equal(got, want.reshape(q.shape))


@pytest.mark.parametrize("groups,shape", [(1, (4, 64, 4, 16)), (1, (4, 96, 2, 4)), (4, (4, 32, 8, 8))])
def test_int_groupnorm_within_one_lsb_of_float(groups, shape):
    q, gamma, beta = _gn_case(2, shape)
    in_scale, out_scale, eps, zp = 0.02, 2**-4, 1e-5, 128
    count = shape[1] // groups * shape[2] * shape[3]
    shift = layernorm_headroom(count, 128)
    k = layernorm_constants(gamma, beta, eps, in_scale / 2**shift, shape[1], out_scale, -128, 127, 0, count=count)
    got = int_groupnorm(q, groups, zp, shift, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127)
    y = F.group_norm((q - zp).double() * in_scale, groups, gamma, beta, eps)
    diff = (got - quantize(y, out_scale, 0, -128, 127).to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.02


def test_int_groupnorm_refuses_rows_that_leave_int32():
    assert not layernorm_fits(LN_MAX_ROW + 1, 1) and layernorm_fits(LN_MAX_ROW, 1)
    q = torch.randint(0, 256, (1, 64, 32, 32), generator=torch.Generator().manual_seed(0))  # 65,536 values a row
    gamma = torch.ones(64, dtype=torch.int64)
    with pytest.raises(OverflowError, match="int_groupnorm"):  # exact squares of 8-bit codes do not fit
        int_groupnorm(q, 1, 0, 0, gamma, torch.zeros_like(gamma), 0, 0, 0, -128, 127)
    assert groupnorm_shifts(64 * 32 * 32, 255) == (0, 2)
    assert groupnorm_shifts(8 * 16, 255)[0] > 0 and groupnorm_shifts(8 * 16, 255)[1] == 0


def test_a_square_shift_of_zero_is_the_exact_kernel():
    """With no square shift, a row within LN_MAX_ROW is LayerNorm's arithmetic, bit for bit."""
    q, gamma, beta = _gn_case(4, (2, 8, 3, 5))
    k = layernorm_constants(gamma, beta, 1e-5, 0.02, 8, 2**-4, -128, 127, 0, count=120)
    args = (q, 1, 128, 1, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127)
    rows = q.reshape(2, 120)
    want = torch.stack([int_layernorm(rows[r], 128, 1, k["gamma_q"].repeat_interleave(15),
                                      k["beta_q"].repeat_interleave(15), k["eps_q"], k["out_shift"], 0, -128, 127)
                        for r in range(2)])
    assert torch.equal(int_groupnorm(*args, 0), want.reshape(q.shape))


@pytest.mark.parametrize("shape", [(2, 64, 32, 32), (1, 128, 64, 64)])  # ImageNet-size MobileViT-v2 rows
def test_int_groupnorm_of_long_rows_within_one_lsb_of_float(shape):
    """Rows past LN_MAX_ROW values: the squares rounded down until their sum fits, the nearest mean; within
    one output step of float, and as often exact as a short row."""
    q, gamma, beta = _gn_case(3, shape)
    in_scale, out_scale, eps, zp = 0.02, 2**-4, 1e-5, 0
    count = shape[1] * shape[2] * shape[3]
    shift, square = groupnorm_shifts(count, 255)
    assert count > LN_MAX_ROW and shift == 0 and square > 0
    k = layernorm_constants(gamma, beta, eps, in_scale, shape[1], out_scale, -128, 127, 0, count=count)
    got = int_groupnorm(q, 1, zp, shift, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 0, -128, 127, square)
    y = F.group_norm((q - zp).double() * in_scale, 1, gamma, beta, eps)
    diff = (got - quantize(y, out_scale, 0, -128, 127).to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.02


# --- 7. bilinear upsampling ------------------------------------------------------------
@pytest.mark.parametrize("factors,size", [((2, 2), (3, 5)), ((3, 2), (4, 1)), ((1, 4), (2, 3))])
def test_int_upsample_bilinear_is_torch_bilinear_times_the_weight_unit(factors, size):
    """Exactly 4·fh·fw times torch's float bilinear upsampling (half-pixel centres), borders included."""
    from hybridquant.primitives.arith import int_upsample_bilinear

    x = torch.randint(-128, 128, (2, 3, *size), generator=torch.Generator().manual_seed(sum(size)))
    got = int_upsample_bilinear(x, *factors)
    ref = F.interpolate(x.double(), scale_factor=factors, mode="bilinear", align_corners=False)
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert torch.equal(got, torch.round(ref * 4 * factors[0] * factors[1]).to(torch.int64))
    assert float((got.double() - ref * 4 * factors[0] * factors[1]).abs().max()) < 1e-6  # no rounding needed

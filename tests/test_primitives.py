"""Rounding, quantize/dequantize, shifts and saturation: exact integer arithmetic."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridquant.primitives import (
    dequantize,
    exp2_int,
    fake_quantize,
    is_power_of_two,
    log2_fake_quantize,
    pot_exponent,
    pot_scale,
    qrange,
    quantize,
    round_half_up,
    saturate,
    shift_right_round,
    sqnr_db,
    threshold_fake_quantize,
    threshold_quantize,
)

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def test_round_half_up_ties_go_up():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, -2.5001])
    assert torch.equal(round_half_up(x), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 2.0, -3.0]))


@given(st.integers(2, 16), st.booleans(), st.booleans())
def test_qrange(bits, signed, narrow):
    lo, hi = qrange(bits, signed, narrow)
    assert hi - lo + 1 == (1 << bits) - (1 if (signed and narrow) else 0)
    if signed and narrow:
        assert lo == -hi


@given(INT32, st.integers(0, 31))
def test_shift_right_round_matches_exact_rounding(acc, shift):
    got = int(shift_right_round(torch.tensor([acc], dtype=torch.int64), shift))
    expected = math.floor(acc / 2**shift + 0.5) if shift else acc
    # exact rational rounding, ties toward +inf
    num, den = 2 * acc + (1 << shift), 1 << (shift + 1)
    assert got == expected == (num // den if shift else acc)


@given(st.integers(-(2**20), 2**20), st.integers(1, 8))
def test_shift_left_is_exact(acc, shift):
    assert int(shift_right_round(torch.tensor([acc]), -shift)) == acc * 2**shift


def test_shift_ties_negative_values():
    acc = torch.tensor([-3, -2, -1, 1, 2, 3], dtype=torch.int64)  # /2 -> -1.5 -1 -0.5 0.5 1 1.5
    assert torch.equal(shift_right_round(acc, 1), torch.tensor([-1, -1, 0, 1, 1, 2]))


def test_per_element_shift_vector():
    acc = torch.tensor([100, 100, 100, -100])
    got = shift_right_round(acc, torch.tensor([0, 2, -1, 3]))
    assert torch.equal(got, torch.tensor([100, 25, 200, -12]))


@given(st.lists(INT32, min_size=1, max_size=20), st.integers(2, 16))
def test_saturate_into_range(values, bits):
    lo, hi = qrange(bits, signed=True)
    q = saturate(torch.tensor(values, dtype=torch.int64), lo, hi)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    inside = [(lo <= v <= hi) for v in values]
    assert all(int(a) == b for a, b, ok in zip(q.tolist(), values, inside, strict=True) if ok)


@settings(max_examples=50)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=64), st.integers(-8, 4), st.integers(2, 8))
def test_fake_quantize_equals_dequantize_of_quantize(values, k, bits):
    x = torch.tensor(values, dtype=torch.float32)
    scale, lo, hi = 2.0**k, *qrange(bits, signed=True)
    q = quantize(x, scale, 0, lo, hi)
    assert torch.equal(fake_quantize(x, scale, 0, lo, hi), dequantize(q, scale, 0))
    # inside the range the error is at most half a step
    inside = (x / scale >= lo) & (x / scale <= hi)
    err = (dequantize(q, scale, 0) - x).abs()[inside]
    assert bool((err <= scale / 2 + 1e-6).all())
    # idempotent
    fq = fake_quantize(x, scale, 0, lo, hi)
    assert torch.equal(fake_quantize(fq, scale, 0, lo, hi), fq)


def test_asymmetric_zero_point_is_exact_for_zero():
    q = quantize(torch.tensor([0.0]), 0.1, 37, 0, 255)
    assert int(q) == 37 and float(dequantize(q, 0.1, 37)) == 0.0


def test_per_channel_axis():
    x = torch.ones(2, 3, 4)
    scale = torch.tensor([1.0, 0.5, 0.25])
    q = quantize(x, scale, torch.zeros(3), -128, 127, axis=1)
    assert torch.equal(q[0, :, 0], torch.tensor([1, 2, 4], dtype=torch.int32))
    q_last = quantize(torch.ones(2, 4, 3), scale, torch.zeros(3), -128, 127, axis=-1)
    assert torch.equal(q_last[0, 0], torch.tensor([1, 2, 4], dtype=torch.int32))


def f64(mantissa: int, exp: int) -> float:
    """The float64 ``mantissa · 2^exp`` (``mantissa`` in [2^52, 2^53)), built from its bits: no float math."""
    assert 1 << 52 <= mantissa < 1 << 53 and -1074 < exp + 52 < 1024
    return struct.unpack("<d", (((exp + 52 + 1023) << 52) | (mantissa - (1 << 52))).to_bytes(8, "little"))[0]


#: the 53-bit mantissas on either side of √½·2^53: every float64 with mantissa ≤ TIE_LO rounds down
TIE_LO = math.isqrt(1 << 105)
mantissas = st.one_of(st.integers(1 << 52, (1 << 53) - 1), st.integers(TIE_LO - 4, TIE_LO + 5),
                      st.sampled_from([1 << 52, (1 << 53) - 1]))
exponents = st.integers(-200, 200)


def expected_exponents(mantissa: int, exp: int) -> dict[str, int]:
    """Exact integer answers for x = mantissa · 2^exp: log2 x ∈ [exp + 52, exp + 53)."""
    return {
        "floor": exp + 52,
        "ceil": exp + 52 if mantissa == 1 << 52 else exp + 53,
        # round up iff mantissa / 2^53 > √½ ⟺ 2·mantissa² > 2^106 (no float is exactly √½·2^53)
        "round": exp + 53 if 2 * mantissa * mantissa > 1 << 106 else exp + 52,
    }


@given(mantissas, exponents)
def test_pot_exponent_is_exact_at_and_next_to_every_tie(mantissa, exp):
    x = f64(mantissa, exp)
    for mode, k in expected_exponents(mantissa, exp).items():
        assert int(pot_exponent(x, mode)) == k, mode
        assert int(pot_exponent(torch.tensor([x], dtype=torch.float64), mode)[0]) == k, mode
    assert pot_scale(x, "round").item() == f64(1 << 52, expected_exponents(mantissa, exp)["round"] - 52)


@given(st.integers(1 << 23, (1 << 24) - 1), st.integers(-60, 60))
def test_pot_exponent_of_float32_tensors(mantissa, exp):
    # float32 inputs widen exactly: the same integer rule at 24 bits
    x = torch.tensor([f64(mantissa << 29, exp - 29)], dtype=torch.float32)
    assert int(pot_exponent(x, "round")[0]) == (exp + 24 if 2 * mantissa * mantissa > 1 << 48 else exp + 23)
    assert int(pot_exponent(x, "ceil")[0]) == (exp + 23 if mantissa == 1 << 23 else exp + 24)


def test_pot_exponent_next_to_the_round_tie():
    below, above = f64(TIE_LO, 0), f64(TIE_LO + 1, 0)  # the two float64 neighbours of √½·2^53
    assert int(pot_exponent(below, "round")) == 52 and int(pot_exponent(above, "round")) == 53
    assert int(pot_exponent(2.0**0.5, "round")) == 1  # float64 √2 lies just above √2


@given(st.floats(1e-30, 1e30))
def test_pot_exponent_off_ties_is_nearest_in_log2(s):
    # the bit-level rule agrees with rounding log2 wherever log2 is not within float error of a tie
    log = math.log2(s)
    if abs(log - math.floor(log) - 0.5) > 1e-9:
        assert int(pot_exponent(s, "round")) == math.floor(log + 0.5)


def test_pot_exponent_exact_mode_and_bad_input():
    assert pot_exponent(torch.tensor([0.25, 8.0]), "exact").tolist() == [-2, 3]
    for bad, mode in ((0.3, "exact"), (0.0, "round"), (-1.0, "ceil"), (float("inf"), "floor"), (1.0, "nearest")):
        with pytest.raises(ValueError):
            pot_exponent(bad, mode)


@given(st.integers(-1022, 1023))
def test_exp2_int_is_exact(k):
    assert exp2_int(k).item() == f64(1 << 52, k - 52)


def test_is_power_of_two():
    assert is_power_of_two(1.0) and is_power_of_two(2.0**-20) and not is_power_of_two(0.3)
    assert not is_power_of_two(0.0) and not is_power_of_two(-2.0)


def test_log2_quantizer_outputs_powers_of_two_or_zero():
    x = torch.rand(1000)
    y = log2_fake_quantize(x, 4)
    nz = y[y > 0]
    assert all(is_power_of_two(v) for v in nz.tolist())
    assert float(y.max()) <= 1.0


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-4  # float32 product, float64 ratio


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=32),
       st.lists(st.integers(-4000, 4000), max_size=20, unique=True), st.integers(-8, 2))
def test_threshold_quantize_counts_bounds_at_or_below(values, thresholds, k):
    t = torch.tensor(sorted(thresholds), dtype=torch.int64)
    x = torch.tensor(values, dtype=torch.float32)
    step = 2.0**k
    codes = threshold_quantize(x, t, step)
    want = [sum(1 for b in sorted(thresholds) if b * step <= v) for v in x.tolist()]
    assert codes.tolist() == want
    levels = torch.arange(len(thresholds) + 1, dtype=torch.float32) * 10
    assert torch.equal(threshold_fake_quantize(x, t, step, levels), levels[codes])


def test_threshold_quantize_bound_belongs_to_the_code_above():
    t = torch.tensor([-2, 0, 3])
    x = torch.tensor([-0.51, -0.5, -0.01, 0.0, 0.74, 0.75, 9.0])
    assert threshold_quantize(x, t, 0.25).tolist() == [0, 1, 1, 2, 2, 3, 3]

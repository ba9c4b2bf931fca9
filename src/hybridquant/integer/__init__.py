"""Integer-only arithmetic shared by the integer executor and the simulation.

:mod:`.arith` holds the kernels (requantization by shifts, alignment, lookup
tables, integer softmax / log2 softmax, integer LayerNorm) and the setup
functions that turn float parameters into their integer tables and constants.
"""

from .arith import (
    align,
    apply_channel_lut,
    apply_lut,
    build_channel_lut,
    build_lut,
    div_round_half_up,
    int_layernorm,
    int_log2_softmax,
    int_softmax,
    isqrt,
    layernorm_constants,
    multiplier_to_shifts,
    requantize,
    requantize_two_term,
    softmax_exp_table,
)

__all__ = [
    "align",
    "apply_channel_lut",
    "apply_lut",
    "build_channel_lut",
    "build_lut",
    "div_round_half_up",
    "int_layernorm",
    "int_log2_softmax",
    "int_softmax",
    "isqrt",
    "layernorm_constants",
    "multiplier_to_shifts",
    "requantize",
    "requantize_two_term",
    "softmax_exp_table",
]

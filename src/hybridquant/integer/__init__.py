"""Integer-only arithmetic: the kernels (:mod:`.arith`), the softmax / LayerNorm wrappers shared
with the simulation (:mod:`.nonlinear`), the lowering of a quantized graph to a program
(:mod:`.lower` -> :class:`.program.Program`), its interpreter (:mod:`.executor`) and its evaluation.

:mod:`.arith` holds the kernels (requantization by shifts, alignment, lookup
tables, integer softmax / log2 softmax, integer LayerNorm) and the setup
functions that turn float parameters into their integer tables and constants.
"""

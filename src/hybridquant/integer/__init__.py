"""The integer program: the lowering of a quantized graph (:mod:`.lower` -> :class:`.program.Program`), its
interpreter (:mod:`.executor`) and its evaluation against labels and the simulation (:mod:`.evaluate`).

The integer kernels are in :mod:`hybridquant.primitives.arith`; what each op computes is declared in the op
table, :mod:`hybridquant.ops`.
"""

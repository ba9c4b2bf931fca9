"""The op table: one module per op kind, each declaring in one place its float semantics, its role in
quantization, its integer lowering, how the integer program runs it and its constants.

Modules: :mod:`.io` (input quantizer, output dequantization), :mod:`.conv` (conv2d, linear),
:mod:`.matmul`, :mod:`.add_concat`, :mod:`.mul`, :mod:`.unary` (lookup tables), :mod:`.softmax`,
:mod:`.layer_norm`, :mod:`.group_norm`, :mod:`.norms` (BatchNorm), :mod:`.pooling`, :mod:`.layout`,
:mod:`.scale_channels` (outlier scaling), :mod:`.upsample`. Walkers look ops up with :func:`op_def` and
:func:`program_kind` (:mod:`.registry`).
"""

from . import (
    add_concat,
    conv,
    group_norm,
    io,
    layer_norm,
    layout,
    matmul,
    mul,
    norms,
    pooling,
    scale_channels,
    softmax,
    unary,
    upsample,
)
from .registry import (
    COUNT_KEYS,
    OP_DEFS,
    PROGRAM_KIND_DEFS,
    OpDef,
    OpSet,
    ProgramKind,
    op_def,
    op_providing,
    ops_where,
    program_kind,
    register,
    run_float,
)
from .unary import unary_fn

__all__ = ["COUNT_KEYS", "OP_DEFS", "PROGRAM_KIND_DEFS", "OpDef", "OpSet", "ProgramKind", "add_concat", "conv", "group_norm", "io", "layer_norm", "layout",
           "matmul", "mul", "norms", "op_def", "op_providing", "ops_where", "pooling", "program_kind", "register", "run_float",
           "scale_channels", "softmax", "unary", "unary_fn", "upsample"]

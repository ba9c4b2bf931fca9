"""The op table's registry: each graph op kind and each integer-program kind is declared once.

An :class:`OpDef` (graph op) gives its float semantics (shapes follow from
them on meta tensors), its role in quantization and its integer lowering; a
:class:`ProgramKind` (what an op of the lowered program computes) gives its
contract for the exports (``doc``), how the interpreter runs it and what its
constants are. The walkers (graph execution, lowering, the interpreter,
program accounting) look ops up here and know no op by name; adding an op kind
means adding one module that registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any

import torch

#: roles of a graph op: ``value`` ops change values (an output quantizer each); ``data_movement`` ops move codes;
#: ``source``/``sink`` are the graph's input and output; ``folded`` ops exist only before quantization
ROLES = ("value", "data_movement", "source", "sink", "folded")


@dataclass(frozen=True)
class OpDef:
    """A graph op kind.

    ``float(node, inputs)`` is the reference semantics on float tensors (``node.attrs``/``node.params``);
    ``mac`` marks multiply-accumulate ops (every input integer), ``elementwise`` the non-linearities run
    as lookup tables; ``lower(ctx, node, op)`` records the op's integer form into the program op ``op``
    and returns its accumulator's :class:`~hybridquant.ops.values.Value` (None when the op leaves no
    accumulator to requantize), or is None where the op has no integer lowering;
    ``simulate(node, in_qp, out_qp)``, when given, returns the integer kernel the simulation runs for the
    node instead of its float op (None where the node's quantizers do not allow it); ``onnx(ex, node, xs)``
    emits the float op into an ONNX graph (``ex``: :mod:`hybridquant.export.onnx`'s exporter, ``xs`` the
    input tensors' names) and returns its output's name. ``unit_interval``: the op's outputs lie in
    [0, 1] (an unsigned quantizer from 0). ``fold(graph, node)``: folds a ``folded`` op into its producer
    (the float function unchanged); ``absorb(graph, node, shapes)``: folds the node into a neighbour where the
    graph allows it, exactly in float, and says whether it did (a product with a constant into a layer's
    rows); ``is_identity(node)``: whether this node computes its input unchanged.

    What the methods ask of an op (they look ops up by these, never by name):
    ``weighted``: its ``weight`` is a layer weight, quantized per output channel (rows: dim 0), with an integer
    bias at s_in·s_w; ``channel_axis``: the dim of its input and output activations that holds channels
    (negative: counted from the last); ``norm``: what it normalizes each position over (``"channels"``: a
    LayerNorm over its last dim; ``"groups"``: channel groups and space), with a per-channel affine when its
    params hold ``weight``; ``output_min``: the least value its float function takes, where it is finite and
    below zero (a small negative tail: SiLU, GELU, hardswish); ``weight_layout(node)``: ``"dense"`` (every
    output row meets every input channel), ``"depthwise"`` (each input channel meets only its own rows) or
    None; ``columns(node, x)``: the input ``x`` as the columns the flattened weight multiplies (``[K, N]``;
    ``[C, k, N]`` depthwise); ``pointwise(node)``: its output at a position depends on its input at that
    position only, with no padding (a shift of its input folds exactly into its bias);
    ``channel_scale(node)``: the per-channel factor the op multiplies its input by; ``kernel_output``: its
    integer kernel writes codes on its own output quantizer's grid (softmax, LayerNorm, GroupNorm), so the op
    keeps that quantizer even where its only reader is an explicit scaling, which then reads those codes.
    """

    name: str
    float: Callable[[Any, list[torch.Tensor]], torch.Tensor] | None
    role: str = "value"
    mac: bool = False
    elementwise: bool = False
    lower: Callable[..., Any] | None = None
    simulate: Callable[..., Any] | None = None
    onnx: Callable[..., str] | None = None
    unit_interval: bool = False
    fold: Callable[..., None] | None = None
    absorb: Callable[..., bool] | None = None
    is_identity: Callable[..., bool] | None = None
    weighted: bool = False
    channel_axis: int | None = None
    norm: str | None = None
    output_min: float | None = None
    weight_layout: Callable[..., str | None] | None = None
    columns: Callable[..., torch.Tensor] | None = None
    pointwise: Callable[..., bool] | None = None
    channel_scale: Callable[..., torch.Tensor] | None = None
    kernel_output: bool = False

    @property
    def changes_values(self) -> bool:
        """Its output carries new values (the graph's input included), so it gets an output quantizer."""
        return self.role in ("value", "source")

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role} of op {self.name}")
        if self.norm not in (None, "channels", "groups"):
            raise ValueError(f"unknown norm {self.norm} of op {self.name}")


@dataclass(frozen=True)
class ProgramKind:
    """An op kind of the lowered integer program.

    ``doc``: what it computes (the exports' contract). ``result``: ``codes`` (its output is codes as is),
    ``accumulator`` (an exact integer result, then the op's requantization), ``logits`` (the host's output
    dequantization) or ``none``. ``run(op, consts, state, vals, accs)`` computes that result from the
    values so far (``vals``: codes by op name, the input op's entry holding the float images; ``accs``:
    accumulators kept for a later read); ``prepare(op, consts, bounds, program)``, when given, runs once
    before (``bounds``: the largest ``|code − zero point|`` of every value) and returns the ``state``.
    ``host``: runs on the host, not deployed; ``computes``: does arithmetic (not data movement);
    ``table``: holds a lookup table; ``category``: storage category of its own constants;
    ``macs(op, program)``: multiply-accumulates per image; ``counts(op, program)``: the other operations per
    image (:data:`COUNT_KEYS`: multiplies, shifts, additions, comparisons, table lookups, divisions; the
    requantization is counted apart); ``widths(op, bounds, done, program)``: the largest magnitude of
    each intermediate (``acc``: the result before requantization; ``acc_per_channel``, optional, a list: the
    bound of each output channel, which a per-channel requantization meets) over every input in range (``bounds``: the
    largest ``|code − zero point|`` of each value; ``done``: earlier ops' magnitudes); ``c(op, em)``: the C statements that compute the
    result into the op's buffers (``em``: :class:`hybridquant.export.c.Emitter`; the requantization follows).
    """

    name: str
    doc: str
    run: Callable[..., Any] | None = None
    result: str = "accumulator"
    prepare: Callable[..., Any] | None = None
    host: bool = False
    computes: bool = True
    table: bool = False
    category: str | None = None
    macs: Callable[..., int] | None = None
    counts: Callable[..., dict[str, int]] | None = None
    c: Callable[..., list[str]] | None = None
    widths: Callable[..., dict[str, int]] | None = None


#: the operations ``ProgramKind.counts`` reports per image, besides multiply-accumulates
COUNT_KEYS = ("multiplies", "shifts", "adds", "comparisons", "lookups", "divisions")

OP_DEFS: dict[str, OpDef] = {}
PROGRAM_KIND_DEFS: dict[str, ProgramKind] = {}


def register(*defs: OpDef | ProgramKind) -> None:
    """Add op kinds and program kinds to the table (each name once)."""
    for d in defs:
        table: dict[str, Any] = OP_DEFS if isinstance(d, OpDef) else PROGRAM_KIND_DEFS
        if d.name in table:
            raise ValueError(f"{type(d).__name__} {d.name} is registered twice")
        table[d.name] = d


def op_def(name: str) -> OpDef:
    """The :class:`OpDef` of graph op ``name``; ValueError for an unknown op."""
    try:
        return OP_DEFS[name]
    except KeyError:
        raise ValueError(f"unknown op '{name}'") from None


def program_kind(name: str) -> ProgramKind:
    """The :class:`ProgramKind` ``name``; ValueError for an unknown kind."""
    try:
        return PROGRAM_KIND_DEFS[name]
    except KeyError:
        raise ValueError(f"unknown program op kind '{name}'") from None


def run_float(node: Any, inputs: list[torch.Tensor], params: dict[str, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """Apply ``node``'s op to ``inputs`` in float; ``params``, when given, in place of ``node.params`` (a
    fake-quantized or learned weight)."""
    if params is not None:
        node = replace(node, params=params)
    return OP_DEFS[node.op].float(node, inputs)


class OpSet(AbstractSet[str]):
    """The names of the graph ops whose :class:`OpDef` satisfies ``test``, read from the table at each use (an
    op registered later belongs to it too)."""

    def __init__(self, test: Callable[[OpDef], bool]):
        self._test = test

    def __contains__(self, name: object) -> bool:
        d = OP_DEFS.get(name) if isinstance(name, str) else None
        return d is not None and self._test(d)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, d in OP_DEFS.items() if self._test(d)])

    def __len__(self) -> int:
        return sum(1 for d in OP_DEFS.values() if self._test(d))

    @classmethod
    def _from_iterable(cls, it):  # set algebra (|, &, -) gives a plain snapshot
        return frozenset(it)


def ops_where(**flags: Any) -> OpSet:
    """The graph ops whose :class:`OpDef` fields equal ``flags`` (``role="value"``, ``mac=True``)."""
    return OpSet(lambda d: all(getattr(d, k) == v for k, v in flags.items()))


def op_providing(hook: str) -> str:
    """The one graph op whose :class:`OpDef` provides ``hook`` (a transform inserts it by what it does, e.g.
    ``channel_scale``); ValueError unless exactly one does."""
    names = [n for n, d in OP_DEFS.items() if getattr(d, hook) is not None]
    if len(names) != 1:
        raise ValueError(f"{len(names)} ops provide {hook}, not one")
    return names[0]

"""The op graph every part of hybridquant works on.

A :class:`Graph` is a topologically ordered list of :class:`Node` s drawn
from a small vocabulary of ops (``OPS``). It is plain data — op names,
attributes and tensors — so it can be saved inside ``model.hq`` and run
without timm: in float (:meth:`Graph.run`), as a fake-quantized simulation
(an output hook) and, later, in integer arithmetic.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops as op_table
from ..ops import run_float

# The vocabulary comes from the op table (:mod:`hybridquant.ops`): each op's module declares its role.
#: ops that change values and so get an output quantizer (the graph's input included)
VALUE_OPS = op_table.OpSet(lambda d: d.changes_values)
#: ops that only move values around (a quantized input stays on its grid)
LAYOUT_OPS = op_table.ops_where(role="data_movement")
#: multiply-accumulate ops: every input must be an integer tensor
MAC_OPS = op_table.ops_where(mac=True)
#: elementwise non-linearities, run as lookup tables in integer arithmetic
ELEMENTWISE_OPS = op_table.ops_where(elementwise=True)
#: every op
OPS = op_table.OpSet(lambda d: True)


@dataclass
class Node:
    """One op: ``op`` applied to the outputs of ``inputs`` with ``attrs`` and ``params``.

    ``module`` is the timm module path the op came from (``stages.2.1.conv_1x1``)
    and ``block`` the kind of block around it (``mv2``, ``mobilevit``, ``stem``,
    ``head``, ...); both are for analysis and reports.
    """

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    module: str = ""
    block: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op '{self.op}' for node {self.name}")

    @property
    def opdef(self) -> op_table.OpDef:
        """What the op table declares for this node's op (its role, channel axis, hooks)."""
        return op_table.op_def(self.op)


OutputHook = Callable[[Node, torch.Tensor], torch.Tensor]
Kernel = Callable[[list[torch.Tensor]], torch.Tensor]


def evaluate(node: Node, values: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
             override: dict[str, Kernel] | None = None, params: dict[str, torch.Tensor] | None = None
             ) -> torch.Tensor:
    """One value-changing node of a run: the step every walker of the simulation takes.

    Its integer kernel where ``override`` has one (the simulation's softmax and LayerNorm), else its float op
    (with ``params`` in place of its own: a fake-quantized or learned weight), on its inputs as it reads them:
    ``values`` (after their quantizers), or ``raw`` (before them) for a ``raw_input`` reader, which the integer
    program requantizes from the producer's wide accumulator.
    """
    if override is not None and node.name in override:
        return override[node.name]([values[i] for i in node.inputs])
    src = raw if node.attrs.get("raw_input") else values
    return run_float(node, [src[i] for i in node.inputs], params)


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... — the first not in ``taken`` (which it joins)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


@dataclass
class Graph:
    """A topologically ordered op graph with one input and one output."""

    nodes: list[Node]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reindex()

    def _reindex(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes):
            raise ValueError("duplicate node names in graph")

    # -- access -----------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def users(self, name: str) -> list[Node]:
        """Nodes that read the output of ``name``."""
        return [n for n in self.nodes if name in n.inputs]

    def by_op(self, *ops: str) -> list[Node]:
        return [n for n in self.nodes if n.op in ops]

    def where(self, **flags: Any) -> list[Node]:
        """The nodes whose op's :class:`~hybridquant.ops.OpDef` fields equal ``flags`` (``mac=True``)."""
        ops = op_table.ops_where(**flags)
        return [n for n in self.nodes if n.op in ops]

    def producer(self, name: str) -> Node:
        """The value-changing node whose output ``name`` carries (skipping layout ops)."""
        node = self[name]
        while node.op in LAYOUT_OPS:
            node = self[node.inputs[0]]
        return node

    def value_users(self, name: str) -> list[tuple[list[Node], Node, int]]:
        """(layout chain, value-changing reader, input index) for every reader of ``name``'s output,
        layout ops being transparent (the counterpart of :meth:`producer`)."""
        out = []
        stack: list[tuple[str, list[Node]]] = [(name, [])]
        while stack:
            src, chain = stack.pop()
            for user in self.users(src):
                if user.op in LAYOUT_OPS:
                    stack.append((user.name, chain + [user]))
                else:
                    out.extend((chain, user, i) for i, inp in enumerate(user.inputs) if inp == src)
        return out

    # -- editing ----------------------------------------------------------
    def remove(self, name: str, replacement: str) -> None:
        """Delete node ``name``; its users read ``replacement`` instead."""
        for n in self.nodes:
            n.inputs = [replacement if i == name else i for i in n.inputs]
        self.nodes = [n for n in self.nodes if n.name != name]
        self._reindex()

    def insert_after(self, anchor: str, node: Node) -> None:
        """Insert ``node`` after ``anchor`` and route the anchor's users through it."""
        for n in self.nodes:
            if n.name != node.name:
                n.inputs = [node.name if i == anchor else i for i in n.inputs]
        idx = next(i for i, n in enumerate(self.nodes) if n.name == anchor)
        self.nodes.insert(idx + 1, node)
        self._reindex()

    def insert_before(self, consumer: str, index: int, node: Node) -> None:
        """Insert ``node`` on the edge into input ``index`` of ``consumer`` only.

        ``node.inputs`` must already name the edge's source; other readers of
        that source are not affected.
        """
        target = self[consumer]
        target.inputs = [node.name if k == index else i for k, i in enumerate(target.inputs)]
        idx = next(i for i, n in enumerate(self.nodes) if n.name == consumer)
        self.nodes.insert(idx, node)
        self._reindex()

    def clone(self) -> Graph:
        """A deep copy (tensors included)."""
        return copy.deepcopy(self)

    # -- execution --------------------------------------------------------
    def run(self, x: torch.Tensor, hook: OutputHook | None = None, keep: bool = False,
            override: dict[str, Kernel] | None = None) -> Any:
        """Run the graph on ``x``; ``hook(node, out)`` may replace each node's output.

        ``override`` maps node names to replacement implementations (the
        simulation's integer kernels). With ``keep=True`` returns a dict of
        every node's output instead of the graph's output.
        """
        values: dict[str, torch.Tensor] = {}
        # nodes with attrs["raw_input"] read their input before its output quantizer:
        # the integer program requantizes that edge from the wide accumulator directly.
        raw: dict[str, torch.Tensor] = {}
        raw_wanted = {n.inputs[0] for n in self.nodes if n.attrs.get("raw_input")}
        remaining = {n.name: 0 for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                remaining[i] += 1
        for node in self.nodes:
            role = op_table.op_def(node.op).role
            if role == "source":
                out = x
            elif role == "sink":
                out = values[node.inputs[0]]
            else:
                out = evaluate(node, values, raw, override)
            if node.name in raw_wanted:
                raw[node.name] = out
            if hook is not None:
                out = hook(node, out)
            values[node.name] = out
            if not keep:  # free what nobody reads any more
                for i in node.inputs:
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        del values[i]
        return values if keep else values[self.output.name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def shapes(self, batch: int = 1) -> dict[str, list[int]]:
        """Every node's output shape for ``batch`` images, from the float ops run on meta tensors
        (shapes only: no data flows, parameters are replaced by meta tensors of their shape)."""
        c, h, w = self.meta["input_size"]
        values: dict[str, torch.Tensor] = {}
        for node in self.nodes:
            role = op_table.op_def(node.op).role
            if role == "source":
                out = torch.empty(batch, c, h, w, device="meta")
            elif role == "sink":
                out = values[node.inputs[0]]
            else:
                meta = Node(node.name, node.op, node.inputs, node.attrs,
                            {k: torch.empty_like(p, device="meta") for k, p in node.params.items()})
                out = run_float(meta, [values[i] for i in node.inputs])
            values[node.name] = out
        return {name: list(v.shape) for name, v in values.items()}

    def num_params(self) -> int:
        """Number of parameter elements (weights, biases, norm affines, scale vectors)."""
        return sum(t.numel() for n in self.nodes for k, t in n.params.items() if not k.startswith("running_"))

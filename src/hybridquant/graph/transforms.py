"""Graph transforms that leave the float function unchanged."""

from __future__ import annotations

from ..ops import op_def
from .ir import Graph


def fold_batch_norm(graph: Graph) -> int:
    """Fold every op that exists only before quantization (BatchNorm: into the conv before it, by the op
    table's ``fold``); returns how many were folded."""
    folded = [node for node in graph if op_def(node.op).role == "folded"]
    for node in folded:
        op_def(node.op).fold(graph, node)
    return len(folded)


def remove_identities(graph: Graph) -> int:
    """Drop the nodes that compute their input unchanged (a multiplication by exactly 1.0, left by the
    attention-scale fold)."""
    identities = [node for node in graph if (test := op_def(node.op).is_identity) is not None and test(node)]
    for node in identities:
        graph.remove(node.name, node.inputs[0])
    return len(identities)


def absorb_nodes(graph: Graph) -> int:
    """Fold each node whose op can go into a neighbour (``OpDef.absorb``: a product with a constant into the
    rows of the layer before it) where the graph allows; returns how many were folded. Exact in float."""
    folded, shapes = 0, None
    for node in [n for n in graph if op_def(n.op).absorb is not None]:
        shapes = shapes or graph.shapes()  # unchanged by the folds
        folded += bool(op_def(node.op).absorb(graph, node, shapes))
    return folded

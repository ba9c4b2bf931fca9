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

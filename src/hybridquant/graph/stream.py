"""The float graph run node by node over chunks of images, in bounded memory.

:func:`~hybridquant.graph.ir.Graph.run` computes one batch through the whole graph. The calibration walkers
need the opposite order — one node on *every* calibration image, then the next — because each decision
(an exponent, an α) is an objective summed over all images before the walk moves on. :class:`FloatStream`
gives them that: each value is a :class:`~hybridquant.store.Stored` (chunk by chunk, spilled past the
workspace's budget), computed when first asked for and freed as soon as every reader has it and the caller
let go of it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..ops import op_def, run_float
from ..store import Stored, Workspace
from .ir import Graph, Node


@torch.no_grad()
def image_bytes(graph: Graph, x: torch.Tensor) -> int:
    """Bytes per image of the graph's largest value (measured on the first image of ``x``)."""
    largest = 0

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, out.numel() * out.element_size())
        return out

    graph.run(x[:1], hook=hook)
    return largest


def split_images(graph: Graph, x: torch.Tensor | list[torch.Tensor], ws: Workspace, cap: int | None = None,
                 limit: int | None = None) -> list[torch.Tensor]:
    """The first ``limit`` images (all when None) of ``x`` — a tensor, or a list of batches taken as one — in
    chunks of as many images as the workspace's chunk size allows for this graph (at most ``cap``).

    A chunk inside one batch is a view of it; only a chunk that spans batches is copied, so the calibration
    images are never copied whole (at 256×256, 256 images are 200 MB)."""
    batches = [x] if isinstance(x, torch.Tensor) else [b for b in x if b.shape[0]]
    total = sum(b.shape[0] for b in batches)
    total = total if limit is None else min(total, limit)
    if total == 0:
        return []
    size = ws.chunk_images(image_bytes(graph, batches[0]), cap)
    chunks: list[torch.Tensor] = []
    pieces: list[torch.Tensor] = []
    have = taken = 0
    for b in batches:
        start = 0
        while start < b.shape[0] and taken < total:
            n = min(size - have, b.shape[0] - start, total - taken)
            pieces.append(b[start:start + n])
            have, start, taken = have + n, start + n, taken + n
            if have == size or taken == total:
                chunks.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
                pieces, have = [], 0
    return chunks


class FloatStream:
    """Values of ``graph`` (run in float) on ``chunks`` of images, computed in topological order on demand.

    ``hold``: the values the caller reads (all when None); they stay until :meth:`release`. Every other value
    is freed once all the nodes reading it are computed. The graph is read as it is when a node is computed:
    pass a clone when the caller edits parameters during the walk and wants the values from before.
    """

    def __init__(self, graph: Graph, chunks: list[torch.Tensor], ws: Workspace, hold: Iterable[str] | None = None):
        self.graph, self.ws = graph, ws
        self.nodes = list(graph)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.chunks = chunks
        self.images = [c.shape[0] for c in chunks]
        self.pos = 0
        self.values: dict[str, Stored] = {}
        self.pending = {n.name: 0 for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                self.pending[i] += 1
        self.hold_all = hold is None
        self.held: set[str] = set() if hold is None else set(hold)
        self.released: set[str] = set()  # let go of before being computed

    def advance(self, upto: int) -> None:
        """Compute every node up to index ``upto`` (inclusive)."""
        while self.pos <= min(upto, len(self.nodes) - 1):
            node = self.nodes[self.pos]
            self.pos += 1
            role = op_def(node.op).role
            if role == "sink":
                self._consumed(node)
                continue
            if role == "source":
                out = Stored.of(self.ws, self.chunks)
            else:
                out = Stored(self.ws)
                for b, n in enumerate(self.images):
                    out.append(run_float(node, [self.values[i].chunk(b) for i in node.inputs]), n)
            self.values[node.name] = out
            if self.hold_all and node.name not in self.released:
                self.held.add(node.name)
            self._consumed(node)
            self._maybe_free(node.name)

    def _consumed(self, node: Node) -> None:
        for i in node.inputs:
            self.pending[i] -= 1
            self._maybe_free(i)

    def value(self, name: str) -> Stored:
        """The value of node ``name`` (computed now if needed); an error once it has been freed."""
        self.advance(self.index[name])
        if name not in self.values:
            raise KeyError(f"value '{name}' was freed (not held)")
        return self.values[name]

    def release(self, name: str) -> None:
        """The caller no longer reads ``name``: free it once its readers are computed."""
        self.held.discard(name)
        self.released.add(name)
        self._maybe_free(name)

    def _maybe_free(self, name: str) -> None:
        if name in self.values and self.pending[name] == 0 and name not in self.held:
            self.values.pop(name).free()

    def close(self) -> None:
        """Free every value."""
        for v in self.values.values():
            v.free()
        self.values.clear()

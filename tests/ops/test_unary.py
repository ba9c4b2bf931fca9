"""Elementwise non-linearities: the simulation and the lookup tables compute one function, value for value."""

from __future__ import annotations

import pytest
import torch

from hybridquant.graph.ir import Node
from hybridquant.ops import unary_fn

OPS = {"gelu": {"approximate": "none"}, "silu": {}, "sigmoid": {}, "hardswish": {}, "relu": {}}


@pytest.mark.parametrize("op", list(OPS))
def test_a_value_does_not_depend_on_its_place_in_the_tensor(op):
    """torch's float32 GELU gives 5.34375 for 5.34375 inside a large tensor and 5.3437495 alone (vector and
    scalar paths); the simulation meets that value in a large tensor, a lookup table alone. The op table's
    function takes the same value wherever the element sits."""
    fn = unary_fn(Node("f", op, ["x"], OPS[op]))
    grid = torch.arange(-256, 256, dtype=torch.float32) * 2**-5  # 5.34375 = 171 * 2^-5 among them
    alone = torch.stack([fn(v.reshape(1))[0] for v in grid])
    inside = fn(grid.repeat(4, 3, 1).contiguous())  # [4, 3, 512]: vector paths
    assert torch.equal(inside, alone.expand_as(inside))
    assert torch.equal(fn(grid), alone)

"""The C export's view simplification: the same elements in the same order, in as few dims as possible."""

from __future__ import annotations

import pytest
import torch

from hybridquant.ops.layout import simplify_view


def _elements(shape, stride, offset, storage):
    return torch.as_strided(storage, shape, stride, offset).reshape(-1)


@pytest.mark.parametrize("make", [
    lambda x: x.reshape(4, 4, 4, 20),                       # contiguous: one dim
    lambda x: x.reshape(4, 4, 20, 4).transpose(2, 3),       # a transpose
    lambda x: x[:960].reshape(3, 4, 4, 4, 5).permute(0, 2, 1, 3, 4),
    lambda x: x.reshape(16, 80)[3],                         # select: an offset
    lambda x: x.reshape(16, 80)[:, 10:30],                  # slice: strided rows
    lambda x: x.reshape(1, 1280)[:, :4].expand(5, 4),       # expand: stride 0
    lambda x: x.reshape(4, 1, 320, 1),                      # size-1 dims
])
def test_simplify_view_keeps_the_elements(make):
    storage = torch.arange(1280)
    view = make(storage)
    shape, stride = simplify_view(list(view.shape), list(view.stride()))
    assert torch.equal(_elements(shape, stride, view.storage_offset(), storage), view.reshape(-1))
    assert len(shape) <= view.dim()


def test_simplify_view_merges_what_it_can():
    assert simplify_view([4, 4, 4, 20], [320, 80, 20, 1]) == ([1280], [1])
    assert simplify_view([4, 4, 20, 4], [320, 80, 1, 20]) == ([16, 20, 4], [80, 1, 20])
    assert simplify_view([4, 1, 96], [96, 96, 1]) == ([384], [1])
    assert simplify_view([], []) == ([], [])

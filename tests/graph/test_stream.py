"""The float graph walked node by node over chunks: the same values as a whole-batch run, freed when unread."""

from __future__ import annotations

import torch

from hybridquant.graph.stream import FloatStream, image_bytes, split_images
from hybridquant.store import Workspace
from tests.methods.conftest import make_toy_graph


def test_stream_values_equal_a_whole_run_and_unheld_values_are_freed(tmp_path):
    graph = make_toy_graph()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = graph.run(x, keep=True)
    with Workspace(0, tmp_path, chunk_bytes=image_bytes(graph, x) * 4) as ws:  # 4 images per chunk, all spilled
        chunks = split_images(graph, x, ws)
        assert [c.shape[0] for c in chunks] == [4, 4, 2]
        stream = FloatStream(graph, chunks, ws, hold={"blk.add"})
        got = stream.value("tok.norm").whole()
        assert torch.allclose(got, whole["tok.norm"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(stream.value("blk.add").whole(), whole["blk.add"], rtol=1e-5, atol=1e-6)
        # everything before the norm that nobody reads any more is gone; the held value stays until released
        assert "stem.conv" not in stream.values and "blk.add" in stream.values
        stream.release("blk.add")
        stream.value("tok.fc")
        assert "blk.add" not in stream.values
        stream.close()
        assert ws.resident == 0


def test_split_images_of_batches_equals_the_split_of_their_concatenation():
    graph = make_toy_graph()
    x = torch.randn(23, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ws = Workspace(chunk_bytes=image_bytes(graph, x) * 5)  # 5 images per chunk
    batches = list(x.split(7))  # chunk boundaries fall inside and across batches
    for limit in (None, 12, 100):
        whole = split_images(graph, x[:limit], ws)
        parts = split_images(graph, batches, ws, limit=limit)
        assert [c.shape[0] for c in parts] == [c.shape[0] for c in whole]
        assert all(torch.equal(a, b) for a, b in zip(parts, whole, strict=True))
    chunks = split_images(graph, batches, ws)
    # the first chunk lies inside the first batch: a view of it, not a copy
    assert chunks[0].untyped_storage().data_ptr() == batches[0].untyped_storage().data_ptr()

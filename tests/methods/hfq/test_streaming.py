"""hfq in bounded memory: walking the calibration images in small chunks, spilled to disk, gives the model a
single in-memory chunk gives (same grids; outputs equal up to float summation order)."""

from __future__ import annotations

import torch

from hybridquant.config import QuantConfig
from hybridquant.graph.stream import image_bytes
from hybridquant.quantize import quantize_graph
from hybridquant.store import Workspace
from tests.methods.conftest import make_toy_graph


def test_chunked_spilled_hfq_equals_the_in_memory_run(tmp_path, toy_calib):
    graph = make_toy_graph()
    calib = torch.cat(toy_calib)
    config = QuantConfig.build(method="hfq", scales="pot", wbits=6, abits=6, reconstruction_iters=20)
    whole = quantize_graph(graph, config, calib)
    per_image = image_bytes(graph, calib)
    with Workspace(0, tmp_path, chunk_bytes=per_image * 5) as ws:  # 5 images per chunk, every value on disk
        chunked = quantize_graph(graph, config, calib, workspace=ws)
        assert ws.spilled_bytes > 0 and ws.peak_resident == 0
    assert list(tmp_path.iterdir()) == []  # spill files removed
    assert whole.act.keys() == chunked.act.keys()
    for name, qp in whole.act.items():
        assert torch.equal(qp.scale, chunked.act[name].scale), name
        assert torch.equal(qp.zero_point, chunked.act[name].zero_point), name
    for name, qp in whole.weight.items():
        assert torch.equal(qp.scale, chunked.weight[name].scale), name
    x = calib[:16]
    a, b = whole.run(x), chunked.run(x)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max())

"""model.hq: exact reload, byte-identical saves, clear errors on bad files."""

from __future__ import annotations

import pytest
import torch

from hybridquant import qmodel
from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.quantize import quantize_graph

META = {"name": "mobilevit_xxs", "num_classes": 3, "class_names": ["a", "b", "c"], "data_cfg": {}}


@pytest.fixture(scope="module", params=["float", "pot"])
def qgraph(request, mvit_graph, calib_images):
    return quantize_graph(mvit_graph, QuantConfig(method="minmax", scales=request.param, wbits=6, abits=6), calib_images)


def test_reload_is_exact(tmp_path, qgraph, calib_images):
    path = tmp_path / "model.hq"
    qmodel.save(path, qgraph, META)
    loaded, meta = qmodel.load(path)
    assert meta == META
    x = calib_images[:3]
    assert torch.equal(loaded(x), qgraph(x))
    for name, w in qgraph.weight_int.items():
        assert torch.equal(loaded.weight_int[name], w)


def test_file_holds_integer_weights(tmp_path, qgraph):
    path = tmp_path / "model.hq"
    qmodel.save(path, qgraph, META)
    data = torch.load(path, weights_only=True)
    ints = [e["weight_int"] for e in data["nodes"] if "weight_int" in e]
    assert ints and all(t.dtype == torch.int8 for t in ints)


def test_same_inputs_give_identical_bytes(tmp_path, mvit_graph, calib_images):
    cfg = QuantConfig(method="minmax", scales="pot")
    a, b = tmp_path / "a.hq", tmp_path / "b.hq"
    qmodel.save(a, quantize_graph(mvit_graph, cfg, calib_images), META)
    qmodel.save(b, quantize_graph(mvit_graph, cfg, calib_images), META)
    assert a.read_bytes() == b.read_bytes()


def test_truncated_file_is_a_clear_error(tmp_path, qgraph):
    path = tmp_path / "model.hq"
    qmodel.save(path, qgraph, META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HybridQuantError) as info:
        qmodel.load(path)
    assert str(info.value) == f"cannot read quantized model {path}: not a valid or complete model.hq file"


def test_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.hq"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(HybridQuantError, match="not a hybridquant model") as info:
        qmodel.load(path)
    assert str(path) in str(info.value)  # the message names the file
    with pytest.raises(HybridQuantError, match="not found"):
        qmodel.load(tmp_path / "missing.hq")
    with pytest.raises(HybridQuantError, match=f"quantized model {tmp_path} is a directory, not a file"):
        qmodel.load(tmp_path)


def test_malformed_entries_are_a_clear_error(tmp_path, qgraph):
    data = qmodel.to_dict(qgraph, META)
    del data["nodes"][3]["op"]
    path = tmp_path / "bad.hq"
    torch.save(data, path)
    with pytest.raises(HybridQuantError, match="malformed"):
        qmodel.load(path)

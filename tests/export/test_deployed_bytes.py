"""deployed_bytes: every constant of the lowered program, sub-8-bit weights packed — exactly what the npz stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.export import export_c, export_npz, load_npz
from hybridquant.export import reader as rr
from hybridquant.export.program import pack_bits
from hybridquant.graph.ir import Graph, Node
from hybridquant.integer.executor import IntegerModel
from hybridquant.integer.program import STORAGE_CATEGORIES
from hybridquant.ops import program_kind
from hybridquant.pipeline import integer_summary
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import _conv, make_toy_graph


@pytest.fixture(scope="module")
def toy_calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return list((torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1).split(8))


CONFIGS = {
    "hfq-w8a8": QuantConfig.build(method="hfq", scales="pot", wbits=8, abits=8, reconstruction_iters=20),
    "hfq-w4a8": QuantConfig.build(method="hfq", scales="pot", wbits=4, abits=8, reconstruction_iters=20),
    "minmax-w6a6": QuantConfig(method="minmax", scales="pot", wbits=6, abits=6),
}


@pytest.fixture(scope="module")
def qgraphs(toy_calib):
    return {name: quantize_graph(make_toy_graph(), cfg, toy_calib) for name, cfg in CONFIGS.items()}


def _npz_bytes(path) -> tuple[int, int]:
    """(bytes of the device arrays, bytes of the host ops' arrays) of an exported npz, from the file alone."""
    manifest, arrays = load_npz(path)
    host_keys = {m["key"] for op in manifest["ops"] if program_kind(op["kind"]).host for m in op["arrays"].values()}
    device = sum(a.nbytes for k, a in arrays.items() if k not in host_keys)
    host = sum(a.nbytes for k, a in arrays.items() if k in host_keys)
    return device, host


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deployed_bytes_is_the_npz_size(name, qgraphs, tmp_path):
    qg = qgraphs[name]
    integer, size = integer_summary(qg)  # what report.json says, computed without any exporter
    assert integer["integer_only"] and size["deployed_bytes_basis"] == "lowered integer program"
    assert isinstance(size["deployed_bytes"], int)
    assert set(size["deployed_bytes_breakdown"]) == set(STORAGE_CATEGORIES)
    assert size["deployed_bytes"] == sum(size["deployed_bytes_breakdown"].values())
    export_npz(qg, tmp_path / "m.npz")
    device, host = _npz_bytes(tmp_path / "m.npz")
    assert size["deployed_bytes"] == device
    assert size["host_bytes"] == host
    parts = size["deployed_bytes_breakdown"]
    assert parts["weights"] > 0 and parts["biases"] > 0 and parts["lookup_tables"] > 0
    assert parts["softmax_constants"] > 0 and parts["layernorm_constants"] > 0 and parts["requant_shifts"] > 0


def test_sub_8_bit_weights_are_packed(qgraphs, tmp_path):
    for name, bits in (("hfq-w4a8", 4), ("minmax-w6a6", 6)):
        qg = qgraphs[name]
        manifest = export_npz(qg, tmp_path / f"{name}.npz")
        weights = {op["name"]: op["arrays"]["weight"] for op in manifest["ops"] if "weight" in op["arrays"]}
        assert set(weights) == set(qg.weight_int)
        for node, meta in weights.items():
            count = qg.weight_int[node].numel()
            assert meta["packed"]["bits"] == bits and meta["packed"]["shape"] == list(qg.weight_int[node].shape)
            assert meta["dtype"] == "int8" and meta["shape"] == [(count * bits + 7) // 8]
        _, size = integer_summary(qg)
        assert size["deployed_bytes_breakdown"]["weights"] == sum(
            (q.numel() * bits + 7) // 8 for q in qg.weight_int.values())
    manifest = export_npz(qgraphs["hfq-w8a8"], tmp_path / "w8.npz")
    assert not any("packed" in m for op in manifest["ops"] for m in op["arrays"].values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reader_unpacks_to_identical_logits(name, qgraphs, tmp_path):
    qg = qgraphs[name]
    export_npz(qg, tmp_path / "m.npz")
    program = rr.load(tmp_path / "m.npz")
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 3 - 1.5
    want_logits, want = IntegerModel(qg).run(x)
    logits, codes = rr.run(program, x.numpy())
    assert np.array_equal(codes, want.numpy()) and np.array_equal(logits, want_logits.numpy())
    for op in program.ops:
        if "weight" in op["arrays"]:
            assert np.array_equal(program.get(op, "weight"), qg.weight_int[op["name"]].numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 12])
def test_pack_unpack_round_trip(bits):
    gen = np.random.default_rng(bits)
    for signed in (True, False):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        codes = gen.integers(lo, hi + 1, size=(5, 3, 7)).astype(np.int16 if bits > 8 else np.int8)
        codes.flat[0] = lo if signed else hi  # a negative code somewhere decides the signedness
        stream = pack_bits(codes, bits)
        assert stream.dtype == np.int8 and stream.size == (codes.size * bits + 7) // 8
        meta = {"bits": bits, "signed": bool(codes.min() < 0), "shape": list(codes.shape)}
        assert np.array_equal(rr.unpack_bits(stream, meta), codes.astype(np.int64))


def test_packing_layout():
    """4-bit: two per byte, the first code in the low nibble; 6-bit: a little-endian bit stream."""
    assert pack_bits(np.array([1, -2, 7, -8]), 4).view(np.uint8).tolist() == [0xE1, 0x87]
    # codes 1, 2, 3, 4 on 6 bits: stream 000001 | 000010 | 000011 | 000100 (LSB first)
    assert pack_bits(np.array([1, 2, 3, 4]), 6).view(np.uint8).tolist() == [0x81, 0x30, 0x10]


def test_c_project_stores_the_packed_bytes(qgraphs, tmp_path):
    qg = qgraphs["hfq-w4a8"]
    export_c(qg, tmp_path / "m")
    manifest = export_npz(qg, tmp_path / "m.npz")
    text = (tmp_path / "m" / "model.c").read_text()
    weights = [op for op in manifest["ops"] if "weight" in op["arrays"]]
    assert weights
    for op in weights:
        meta = op["arrays"]["weight"]
        assert meta["packed"]["bits"] == 4  # the npz's byte stream, as many bytes in C
        assert f"static const uint8_t hq_op{op['index']:04d}_weight[{meta['shape'][0]}]" in text


def test_identity_requantizations_are_counted_apart(qgraphs):
    im = IntegerModel(qgraphs["minmax-w6a6"])
    identity = real = 0
    for op in im.program.ops:
        if op.attrs.get("requant", {}).get("mode") == "shift":
            if np.all(op.arrays["requant.shift"] == 0):
                identity += 1
            else:
                real += 1
    assert identity >= 3 + 1 + 2  # after the 3 lookup tables, the softmax and both LayerNorms at least
    assert im.stats["requant_identity"] == identity and im.stats["requant_shifts"] == real
    integer, _ = integer_summary(qgraphs["minmax-w6a6"])
    assert integer["identity_requantizations"] == identity
    assert integer["requant_multiplies_replaced_by_shifts"] == real


def _float_graph() -> Graph:
    gen = torch.Generator().manual_seed(0)
    return Graph([Node("input", "input", []), _conv("c1", "input", 3, 4, 3, gen), Node("act", "silu", ["c1"]),
                  _conv("c2", "act", 4, 4, 1, gen), Node("output", "output", ["c2"])], meta={"input_size": [3, 6, 6]})


def test_integer_op_fraction_is_measured(toy_calib):
    """Float multipliers make the conv ops non-integer (the SiLU table and its identity requant stay integer)."""
    qg = quantize_graph(_float_graph(), QuantConfig(method="minmax", scales="float"), toy_calib)
    integer, size = integer_summary(qg)
    assert integer["integer_only"] is False
    assert integer["ops"] == 3 and integer["integer_ops"] == 1
    assert integer["integer_op_fraction"] == pytest.approx(1 / 3)
    assert integer["macs"] == 4 * 36 * 27 + 4 * 36 * 4 and integer["integer_mac_fraction"] == 0.0
    assert integer["float_requantizations"] == 2 and integer["identity_requantizations"] == 1
    assert size["deployed_bytes_basis"].startswith("estimate") and isinstance(size["deployed_bytes"], int)
    pot = quantize_graph(_float_graph(), QuantConfig(method="minmax", scales="pot"), toy_calib)
    integer, _ = integer_summary(pot)
    assert integer["integer_only"] and integer["integer_op_fraction"] == 1.0 and integer["integer_mac_fraction"] == 1.0
    assert integer["macs"] == 4 * 36 * 27 + 4 * 36 * 4

"""``model.hq``: a quantized model saved as plain data.

The file is a ``torch.save`` archive (read back with ``weights_only=True``)
holding the op graph, integer weights (int8/int16 codes) and int32 biases,
every quantizer's scale and zero point, the float parameters that stay float
(LayerNorm affine, per-channel scale vectors), the config and the model's
data config. It needs neither timm nor the original checkpoint to run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_path, plain, read_torch_file
from .config import QuantConfig
from .errors import HybridQuantError
from .graph.ir import Graph, Node
from .graph.quantized import QuantizedGraph
from .primitives import dequantize
from .qparams import QParams

FORMAT = "hybridquant-qmodel"
VERSION = 1


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def to_dict(qgraph: QuantizedGraph, model_meta: dict[str, Any]) -> dict[str, Any]:
    """The serialisable form of ``qgraph`` plus ``model_meta`` (name, data_cfg, class_names)."""
    nodes = []
    for node in qgraph.graph:
        params = {k: v.contiguous() for k, v in node.params.items() if k not in ("weight", "bias")
                  or node.name not in qgraph.weight}
        entry: dict[str, Any] = {
            "name": node.name, "op": node.op, "inputs": list(node.inputs), "attrs": dict(node.attrs),
            "module": node.module, "block": node.block, "params": params,
        }
        if node.name in qgraph.weight:
            wq = qgraph.weight[node.name]
            entry["weight_int"] = qgraph.weight_int[node.name].to(_int_dtype(wq.bits)).contiguous()
            entry["weight_qparams"] = wq.to_dict()
            if node.name in qgraph.bias_int:
                b = qgraph.bias_int[node.name]
                fits32 = b.numel() == 0 or int(b.abs().max()) < 2**31
                entry["bias_int"] = b.to(torch.int32 if fits32 else torch.int64).contiguous()
            elif "bias" in node.params:
                entry["params"]["bias"] = node.params["bias"].contiguous()
        if node.name in qgraph.act:
            entry["act_qparams"] = qgraph.act[node.name].to_dict()
        nodes.append(entry)
    return {
        "format": FORMAT, "version": VERSION, "config": qgraph.config.to_dict(),
        "model": model_meta, "nodes": nodes, "float_nodes": list(qgraph.float_nodes),
        "graph_meta": dict(qgraph.graph.meta), "info": plain(qgraph.info),
    }


def from_dict(data: dict[str, Any]) -> tuple[QuantizedGraph, dict[str, Any]]:
    """Rebuild the quantized graph (bit-identical weights) and the model metadata."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HybridQuantError("not a hybridquant model (missing format tag)")
    if data.get("version") != VERSION:
        raise HybridQuantError(f"unsupported model.hq version {data.get('version')} (this is {VERSION})")
    try:
        config = QuantConfig.from_dict(data["config"])
        act, weight, nodes = {}, {}, []
        for e in data["nodes"]:
            params = dict(e["params"])
            if "weight_int" in e:
                wq = QParams.from_dict(e["weight_qparams"])
                params["weight"] = dequantize(e["weight_int"].to(torch.int32), wq.scale, wq.zero_point, axis=0)
                weight[e["name"]] = wq
            nodes.append(Node(e["name"], e["op"], list(e["inputs"]), dict(e["attrs"]), params, e["module"], e["block"]))
            if "act_qparams" in e:
                act[e["name"]] = QParams.from_dict(e["act_qparams"])
        graph = Graph(nodes, meta=dict(data.get("graph_meta", {})))
        # int32 biases at s_in·s_w: restore the float bias they stand for
        for e in data["nodes"]:
            if "bias_int" in e:
                node = graph[e["name"]]
                x_qp = act[graph.producer(node.inputs[0]).name]
                scale = x_qp.scale.double() * weight[node.name].scale.double()
                node.params["bias"] = (e["bias_int"].double() * scale).float()
        qgraph = QuantizedGraph(graph, config, act, weight, list(data.get("float_nodes", [])), dict(data.get("info", {})))
    except HybridQuantError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise HybridQuantError(f"malformed model.hq: {type(exc).__name__}: {exc}") from exc
    return qgraph, dict(data["model"])


def save(path: str | Path, qgraph: QuantizedGraph, model_meta: dict[str, Any]) -> None:
    """Write ``model.hq`` atomically; the same inputs give byte-identical files."""
    buffer = io.BytesIO()
    torch.save(to_dict(qgraph, model_meta), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load(path: str | Path) -> tuple[QuantizedGraph, dict[str, Any]]:
    """Read ``model.hq``; a missing, truncated or foreign file is a one-line error naming it."""
    path = Path(path)
    data = read_torch_file(path, "quantized model", "model.hq")
    try:
        return from_dict(data)
    except HybridQuantError as exc:
        raise HybridQuantError(f"quantized model {path}: {exc}") from exc

"""Float reference implementations of the graph's ops."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _conv2d(node, x, p):
    a = node.attrs
    return F.conv2d(x, p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])


def _batch_norm(node, x, p):
    return F.batch_norm(x, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0, node.attrs["eps"])


def _layer_norm(node, x, p):
    return F.layer_norm(x, node.attrs["shape"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def _group_norm(node, x, p):
    return F.group_norm(x, node.attrs["groups"], p.get("weight"), p.get("bias"), node.attrs["eps"])


def _scale_channels(node, x, p):
    # x / alpha along the channel dim (dim 1 for NCHW, last for tokens)
    dim = node.attrs["dim"]
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * p["inv_alpha"].reshape(shape)


_UNARY: dict[str, Callable] = {
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "hardswish": F.hardswish,
}


def unary_fn(node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float function of an elementwise node (its attributes applied): what its lookup tables tabulate,
    so that a table and the simulation compute the same function."""
    if node.op == "gelu":
        approximate = node.attrs.get("approximate", "none")
        return lambda x: F.gelu(x, approximate=approximate)
    return _UNARY[node.op]


_IMPL: dict[str, Callable] = {
    "conv2d": lambda n, i, p: _conv2d(n, i[0], p),
    "batch_norm": lambda n, i, p: _batch_norm(n, i[0], p),
    "linear": lambda n, i, p: F.linear(i[0], p["weight"], p.get("bias")),
    "matmul": lambda n, i, p: torch.matmul(i[0], i[1]),
    "add": lambda n, i, p: i[0] + i[1],
    "mul": lambda n, i, p: i[0] * i[1],
    "mul_const": lambda n, i, p: i[0] * n.attrs["value"],
    "cat": lambda n, i, p: torch.cat(i, dim=n.attrs["dim"]),
    "softmax": lambda n, i, p: torch.softmax(i[0], dim=n.attrs["dim"]),
    "layer_norm": lambda n, i, p: _layer_norm(n, i[0], p),
    "group_norm": lambda n, i, p: _group_norm(n, i[0], p),
    "global_avg_pool": lambda n, i, p: i[0].mean(dim=(2, 3), keepdim=True),
    "scale_channels": lambda n, i, p: _scale_channels(n, i[0], p),
    "reshape": lambda n, i, p: i[0].reshape(n.attrs["shape"]),
    "transpose": lambda n, i, p: i[0].transpose(n.attrs["dim0"], n.attrs["dim1"]),
    "permute": lambda n, i, p: i[0].permute(n.attrs["dims"]),
    "flatten": lambda n, i, p: i[0].flatten(n.attrs["start"], n.attrs["end"]),
    "select": lambda n, i, p: i[0].select(n.attrs["dim"], n.attrs["index"]),
    "slice": lambda n, i, p: i[0].narrow(n.attrs["dim"], n.attrs["start"], n.attrs["end"] - n.attrs["start"]),
    "expand": lambda n, i, p: i[0].expand(n.attrs["shape"]),
    "sum": lambda n, i, p: i[0].sum(dim=n.attrs["dims"], keepdim=n.attrs["keepdim"]),
}
for _name in (*_UNARY, "gelu"):
    _IMPL[_name] = lambda n, i, p: unary_fn(n)(i[0])


def run_op(node, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Apply ``node``'s op to ``inputs`` in float."""
    return _IMPL[node.op](node, inputs, node.params)

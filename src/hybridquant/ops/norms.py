"""BatchNorm (folded into the convolution before quantization) and GroupNorm (float only: no integer kernel)."""

from __future__ import annotations

import torch.nn.functional as F

from .registry import OpDef, register


def _batch_norm(node, inputs):
    p = node.params
    return F.batch_norm(inputs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0,
                        node.attrs["eps"])


def _group_norm(node, inputs):
    p = node.params
    return F.group_norm(inputs[0], node.attrs["groups"], p.get("weight"), p.get("bias"), node.attrs["eps"])


register(
    OpDef("batch_norm", _batch_norm, role="folded"),
    OpDef("group_norm", _group_norm),
)

"""Capture a timm model as a :class:`~hybridquant.graph.ir.Graph`.

``torch.export`` at a fixed image size (batch kept dynamic) yields a complete
ATen graph of hybrid models such as MobileViT, whose ``MobileVitBlock``
defeats ``torch.fx.symbolic_trace``. Fused attention is turned off first so
q·kᵀ, softmax and attn·v are separate ops, and the attention scale is folded
into the query rows of the qkv projection so no float multiply remains
between them. The ATen graph is then translated op by op into the small
vocabulary of :mod:`hybridquant.graph.ir`; BatchNorm is folded and no-ops
are dropped (:mod:`hybridquant.graph.transforms`).
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from ..errors import HybridQuantError
from .ir import Graph, Node, unique_name
from .transforms import absorb_nodes, fold_batch_norm, remove_identities

# timm classes -> the block kinds reports talk about (the innermost one a node sits in)
_BLOCK_KINDS = {
    "BottleneckBlock": "mv2",  # MobileNetV2 inverted residual in byobnet/mobilevit
    "InvertedResidual": "mv2",
    "MobileVitBlock": "mobilevit",
    "MobileVitV2Block": "mobilevit",
    # EfficientFormerV2: inverted-bottleneck FFNs (1x1, depthwise 3x3, 1x1), attention with talking heads
    "ConvMlpWithNorm": "ffn",
    "Attention2d": "attention",
    "Attention2dDownsample": "attention",
    "Downsample": "downsample",
    # EfficientViT-M: FFNs, cascaded group attention, MBConv-like patch merging with squeeze-excitation
    "ConvMlp": "ffn",
    "LocalWindowAttention": "attention",
    "PatchMerging": "patch_merging",
}

_ATEN = torch.ops.aten
_UNARY = {
    _ATEN.silu.default: "silu", _ATEN.silu_.default: "silu",
    _ATEN.sigmoid.default: "sigmoid", _ATEN.sigmoid_.default: "sigmoid",
    _ATEN.relu.default: "relu", _ATEN.relu_.default: "relu",
    _ATEN.hardswish.default: "hardswish", _ATEN.hardswish_.default: "hardswish",
}
_IDENTITY = {
    _ATEN.dropout.default, _ATEN.clone.default, _ATEN.contiguous.default,
    _ATEN.alias.default, _ATEN.detach.default, _ATEN.dropout_.default,
}
_SHAPE_ONLY = {_ATEN.sym_size.int, operator.mul, operator.add, operator.floordiv, operator.sub}


def _fold_attention_scale(model: nn.Module) -> None:
    """Turn off fused attention and fold ``scale`` into the q rows of ``qkv``.

    ``q * scale`` would be a float multiply between two integer matmuls;
    folded into the qkv weights it costs nothing and is exact in float.
    """
    from timm.layers import Attention

    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, Attention) and isinstance(module.q_norm, nn.Identity):
            rows = module.num_heads * module.head_dim
            with torch.no_grad():
                module.qkv.weight[:rows] *= module.scale
                if module.qkv.bias is not None:
                    module.qkv.bias[:rows] *= module.scale
            module.scale = 1.0


def _module_info(fx_node: fx.Node) -> tuple[str, str]:
    """(innermost module path, block kind) of an exported node."""
    stack = list(fx_node.meta.get("nn_module_stack", {}).values())
    path = stack[-1][0] if stack else ""
    kind = ""
    for _path, cls in stack:
        name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
        kind = _BLOCK_KINDS.get(name, kind)
    if not kind and path:
        top = path.split(".")[0]
        kind = {"stem": "stem", "patch_embed": "stem", "head": "head", "head_dist": "head", "final_conv": "head",
                "norm": "head", "global_pool": "head"}.get(top, "")
    if not kind and any(p.startswith("stages") for p, _ in stack):
        kind = "stage"
    return path, kind


class _Translator:
    """Walks the exported fx graph and emits hybridquant nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes: list[Node] = []
        self.names: dict[str, str] = {}  # fx node name -> our node name
        self.taken: set[str] = set()
        self.unbinds: dict[str, tuple[str, int]] = {}
        self.splits: dict[str, tuple[str, int, list[int]]] = {}  # split node -> (source, dim, chunk sizes)
        # values computed from parameters and buffers alone (a layer scale's view, an attention-bias table's
        # gather): evaluated once here, so the graph holds them as constants
        self.consts: dict[str, Any] = {}

    def _tensor(self, arg: Any) -> torch.Tensor | None:
        if arg is None:
            return None
        if self._is_const(arg):
            return self.consts[arg.name].detach().clone().float()
        raise HybridQuantError(f"expected a parameter, got {arg}")

    def _attr(self, n: fx.Node) -> torch.Tensor:
        obj = self.gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        return obj.detach()

    def _is_const(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and isinstance(self.consts.get(arg.name), torch.Tensor)

    def _known(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg.name in self.consts

    def _fold_constant(self, n: fx.Node) -> bool:
        """Evaluate ``n`` when every tensor it reads is a constant (no path from the image); True if it was."""
        nodes = _flat_nodes((n.args, n.kwargs))
        if not nodes or not all(self._known(x) for x in nodes):
            return False
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda x: self.consts[x.name])
        with torch.no_grad():
            value = n.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) and not (
                isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)):
            return False
        self.consts[n.name] = value  # a tuple of tensors (a split) is read by getitem, itself folded
        return True

    def _name(self, base: str) -> str:
        return unique_name(base, self.taken)

    def _ref(self, arg: fx.Node) -> str:
        return self.names[arg.name]

    def emit(self, fx_node: fx.Node, op: str, inputs: list[str], attrs=None, params=None, label=None) -> None:
        path, kind = _module_info(fx_node)
        if label is None:
            label = path if op in ("conv2d", "linear", "batch_norm", "layer_norm", "group_norm") and path else (
                f"{path}.{op}" if path else op)
        name = self._name(label)
        params = {k: v for k, v in (params or {}).items() if v is not None}
        self.nodes.append(Node(name, op, inputs, attrs or {}, params, path, kind))
        self.names[fx_node.name] = name

    def translate(self) -> list[Node]:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.emit(n, "input", [], label="input")
            elif n.op == "get_attr":
                self.consts[n.name] = self._attr(n)  # parameters are read where used
            elif n.op == "call_module" and n.target == "_guards_fn":
                continue  # export's shape guards are not ops
            elif n.op == "output":
                out = n.args[0]
                out = out[0] if isinstance(out, (list, tuple)) else out
                self.nodes.append(Node(self._name("output"), "output", [self._ref(out)]))
            elif n.op == "call_function":
                self._call(n)
            else:
                raise HybridQuantError(f"cannot capture graph node {n.format_node()}")
        return self.nodes

    def _call(self, n: fx.Node) -> None:  # noqa: C901 - one branch per ATen op
        t, a = n.target, n.args
        if t in _SHAPE_ONLY or self._fold_constant(n):
            return
        if t in _IDENTITY:
            self.names[n.name] = self._ref(a[0])
        elif t == _ATEN.conv2d.default:
            stride, padding, dilation, groups = (list(a[3:4] or [[1, 1]])[0], list(a[4:5] or [[0, 0]])[0],
                                                 list(a[5:6] or [[1, 1]])[0], (a[6:7] or [1])[0])
            if isinstance(padding, str):
                raise HybridQuantError(f"conv2d with padding='{padding}' is not supported ({n.name})")
            self.emit(n, "conv2d", [self._ref(a[0])],
                      {"stride": list(stride), "padding": list(padding), "dilation": list(dilation), "groups": int(groups)},
                      {"weight": self._tensor(a[1]), "bias": self._tensor(a[2] if len(a) > 2 else None)})
        elif t == _ATEN.batch_norm.default:
            self.emit(n, "batch_norm", [self._ref(a[0])], {"eps": float(a[7])},
                      {"weight": self._tensor(a[1]), "bias": self._tensor(a[2]),
                       "running_mean": self._tensor(a[3]), "running_var": self._tensor(a[4])})
        elif t == _ATEN.linear.default:
            self.emit(n, "linear", [self._ref(a[0])], {},
                      {"weight": self._tensor(a[1]), "bias": self._tensor(a[2] if len(a) > 2 else None)})
        elif t == _ATEN.matmul.default:
            self.emit(n, "matmul", [self._ref(a[0]), self._ref(a[1])])
        elif t == _ATEN.add.Tensor and n.kwargs.get("alpha", 1) == 1:
            const = [k for k in (0, 1) if not isinstance(a[k], fx.Node) or self._is_const(a[k])]
            if len(const) == 1:  # an attention-bias table, a learned offset, a number
                c = a[const[0]]
                value = self._tensor(c) if isinstance(c, fx.Node) else torch.tensor(float(c))
                self.emit(n, "add_const", [self._ref(a[1 - const[0]])], {}, {"value": value})
            else:
                self.emit(n, "add", [self._ref(a[0]), self._ref(a[1])])
        elif t in (_ATEN.mul.Tensor, _ATEN.div.Tensor):
            self._mul(n, t == _ATEN.div.Tensor)
        elif t == _ATEN.cat.default:
            self.emit(n, "cat", [self._ref(x) for x in a[0]], {"dim": int(a[1]) if len(a) > 1 else 0})
        elif t in _UNARY:
            self.emit(n, _UNARY[t], [self._ref(a[0])])
        elif t == _ATEN.gelu.default:
            self.emit(n, "gelu", [self._ref(a[0])], {"approximate": n.kwargs.get("approximate", "none")})
        elif t == _ATEN.softmax.int:
            self.emit(n, "softmax", [self._ref(a[0])], {"dim": int(a[1])})
        elif t == _ATEN.layer_norm.default:
            self.emit(n, "layer_norm", [self._ref(a[0])], {"shape": list(a[1]), "eps": float(a[4]) if len(a) > 4 else 1e-5},
                      {"weight": self._tensor(a[2] if len(a) > 2 else None), "bias": self._tensor(a[3] if len(a) > 3 else None)})
        elif t == _ATEN.group_norm.default:
            self.emit(n, "group_norm", [self._ref(a[0])], {"groups": int(a[1]), "eps": float(a[4]) if len(a) > 4 else 1e-5},
                      {"weight": self._tensor(a[2] if len(a) > 2 else None), "bias": self._tensor(a[3] if len(a) > 3 else None)})
        elif t == _ATEN.adaptive_avg_pool2d.default and list(a[1]) == [1, 1]:
            self.emit(n, "global_avg_pool", [self._ref(a[0])])
        elif t == _ATEN.mean.dim and len(a[0].meta["val"].shape) == 4 and sorted(int(d) % 4 for d in a[1]) == [2, 3]:
            if (a[2:3] or [False])[0]:
                self.emit(n, "global_avg_pool", [self._ref(a[0])])
            else:  # [B, C, H, W] -> [B, C]: the pool, then its two unit dims dropped
                self.emit(n, "global_avg_pool", [self._ref(a[0])], label=f"{_module_info(n)[0] or 'head'}.global_avg_pool")
                self.emit(n, "flatten", [self.names[n.name]], {"start": 1, "end": -1})
        elif t in (_ATEN.reshape.default, _ATEN.view.default, _ATEN._unsafe_view.default):
            self.emit(n, "reshape", [self._ref(a[0])], {"shape": self._static_shape(n, a[1])})
        elif t == _ATEN.transpose.int:
            self.emit(n, "transpose", [self._ref(a[0])], {"dim0": int(a[1]), "dim1": int(a[2])})
        elif t == _ATEN.permute.default:
            self.emit(n, "permute", [self._ref(a[0])], {"dims": [int(d) for d in a[1]]})
        elif t == _ATEN.flatten.using_ints:
            self.emit(n, "flatten", [self._ref(a[0])], {"start": int(a[1]), "end": int(a[2]) if len(a) > 2 else -1})
        elif t == _ATEN.unbind.int:
            self.unbinds[n.name] = (self._ref(a[0]), int(a[1]) if len(a) > 1 else 0)
        elif t == _ATEN.split_with_sizes.default:
            self.splits[n.name] = (self._ref(a[0]), int(a[2]) if len(a) > 2 else 0, [int(s) for s in a[1]])
        elif t in (_ATEN.chunk.default, _ATEN.split.Tensor):
            dim = int(a[2]) if len(a) > 2 else 0
            length = int(a[0].meta["val"].shape[dim])
            step = -(-length // int(a[1])) if t == _ATEN.chunk.default else int(a[1])
            self.splits[n.name] = (self._ref(a[0]), dim, [min(step, length - k) for k in range(0, length, step)])
        elif t == _ATEN.slice.Tensor:
            dim, start, end, step = (list(a[1:]) + [0, None, None, 1][len(a) - 1:])[:4]
            length = int(a[0].meta["val"].shape[int(dim)])
            start, end, _ = slice(start, end).indices(length)
            self.emit(n, "slice", [self._ref(a[0])], {"dim": int(dim), "start": start, "end": end, "step": int(step)})
        elif t == _ATEN.upsample_bilinear2d.vec:
            self._upsample(n)
        elif t == _ATEN.avg_pool2d.default and _is_subsample(a):
            # a 1x1 average pool with a stride only picks pixels: every stride-th row and column
            stride = [int(v) for v in a[2]]
            self.emit(n, "slice", [self._ref(a[0])],
                      {"dim": 2, "start": 0, "end": int(a[0].meta["val"].shape[2]), "step": stride[0]},
                      label=f"{_module_info(n)[0] or 'pool'}.rows")
            first = self.names[n.name]
            self.emit(n, "slice", [first], {"dim": 3, "start": 0, "end": int(a[0].meta["val"].shape[3]),
                                            "step": stride[1]})
        elif t == operator.getitem and isinstance(a[0], fx.Node) and a[0].name in self.splits:
            src, dim, sizes = self.splits[a[0].name]
            start = sum(sizes[: int(a[1])])
            self.emit(n, "slice", [src], {"dim": dim, "start": start, "end": start + sizes[int(a[1])]})
        elif t == _ATEN.sum.dim_IntList:
            self.emit(n, "sum", [self._ref(a[0])], {"dims": [int(d) for d in a[1]],
                                                    "keepdim": bool(a[2]) if len(a) > 2 else False})
        elif t in (_ATEN.expand_as.default, _ATEN.expand.default):
            self.emit(n, "expand", [self._ref(a[0])], {"shape": self._static_shape(n, None)})
        elif t == operator.getitem and isinstance(a[0], fx.Node) and a[0].name in self.unbinds:
            src, dim = self.unbinds[a[0].name]
            self.emit(n, "select", [src], {"dim": dim, "index": int(a[1])})
        elif t == _ATEN.select.int:
            self.emit(n, "select", [self._ref(a[0])], {"dim": int(a[1]), "index": int(a[2])})
        else:
            path, _ = _module_info(n)
            raise HybridQuantError(
                f"the engine cannot quantize op {t} (node {n.name}" + (f" in module {path})" if path else ")")
            )

    def _upsample(self, n: fx.Node) -> None:
        """A bilinear upsampling by integer factors with half-pixel centres (``nn.Upsample(scale_factor=2)``)."""
        x = n.args[0]
        align_corners = bool(n.args[2]) if len(n.args) > 2 else False
        (h, w), (ho, wo) = x.meta["val"].shape[2:], n.meta["val"].shape[2:]
        if align_corners or ho % h or wo % w:
            raise HybridQuantError(f"the engine cannot quantize a bilinear resize other than by integer factors with "
                                   f"half-pixel centres (node {n.name}: {h}x{w} -> {ho}x{wo}, "
                                   f"align_corners={align_corners})")
        self.emit(n, "upsample_bilinear", [self._ref(x)], {"scale": [int(ho) // int(h), int(wo) // int(w)]})

    def _mul(self, n: fx.Node, divide: bool) -> None:
        """A product (or quotient) of a value with a number, a constant tensor, or another value."""
        a = n.args
        x, other = (a[1], a[0]) if self._is_const(a[0]) else (a[0], a[1])
        if self._is_const(other) and self.consts[other.name].numel() == 1:
            other = float(self.consts[other.name])
        if isinstance(other, (int, float)):
            self.emit(n, "mul_const", [self._ref(x)], {"value": 1.0 / float(other) if divide else float(other)})
        elif self._is_const(other):
            value = self._tensor(other)
            self.emit(n, "mul_const", [self._ref(x)], {}, {"value": 1.0 / value if divide else value})
        elif divide:
            raise HybridQuantError(f"the engine cannot quantize a division of two values (node {n.name})")
        else:
            self.emit(n, "mul", [self._ref(a[0]), self._ref(a[1])])

    @staticmethod
    def _static_shape(n: fx.Node, shape) -> list[int]:
        # The traced output shape knows every dim but the batch-dependent one: it becomes -1.
        val = n.meta.get("val")
        dims = list(val.shape) if val is not None else list(shape)
        out = [int(d) if isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) else -1 for d in dims]
        if out.count(-1) > 1:
            raise HybridQuantError(f"cannot capture reshape {n.name}: more than one batch-dependent dim")
        return out


def _flat_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _is_subsample(a: tuple) -> bool:
    """avg_pool2d(x, kernel 1, stride, padding 0): a strided pick of pixels."""
    kernel = list(a[1]) if len(a) > 1 else []
    padding = list(a[3]) if len(a) > 3 else [0, 0]
    return [int(k) for k in kernel] in ([1], [1, 1]) and not any(padding) and len(a) > 2 and bool(a[2])


def capture(model: nn.Module, input_size: tuple[int, int, int]) -> Graph:
    """Capture ``model`` (not modified) for images of ``input_size`` = (C, H, W).

    Returns the op graph with BatchNorm folded and no-ops removed. Raises
    :class:`HybridQuantError` naming the op when the model holds one the
    engine cannot quantize.
    """
    from timm.utils.model import reparameterize_model

    # train-time branches merged into single convs (FastViT, MobileOne); a no-op for other models
    model = reparameterize_model(copy.deepcopy(model).eval().float(), inplace=True)
    _fold_attention_scale(model)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = torch.randn(2, *input_size)
    try:
        with warnings.catch_warnings():  # timm's attention-bias caches are attributes, not buffers: harmless here
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except HybridQuantError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HybridQuantError(f"torch.export cannot capture the model: {first}") from exc
    gm = exported.module()
    nodes = _Translator(gm).translate()
    graph = Graph(nodes, meta={"input_size": list(input_size)})
    fold_batch_norm(graph)
    absorb_nodes(graph)
    remove_identities(graph)
    return graph

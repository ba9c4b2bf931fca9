"""Shared helpers of the peer-tool adapters.

* :func:`traceable` — a copy of a timm MobileViT whose forward is
  ``torch.fx``-traceable and made of plain modules (same float output).
* :func:`quantize_and_evaluate` — time a tool's quantization, evaluate the
  tool's own quantized model on the eval tensors and build the result cell;
  any failure becomes a cell with ``error`` (one line) and ``quant_top1`` None.
* :class:`Unsupported` — raised by an adapter for a setting its tool cannot express.
"""

from __future__ import annotations

import copy
import importlib
import math
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


class Unsupported(Exception):
    """The tool cannot express this setting (recorded as the cell's error)."""


def seed_everything(seed: int = SEED) -> None:
    """Seed Python, NumPy and torch (tools that sample calibration data use one of them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (cells keep errors to one line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if isinstance(exc, Unsupported):
        return f"unsupported: {msg}"
    return f"{type(exc).__name__}: {msg}"[:400]


# --------------------------------------------------------------------------- fx-traceable MobileViT


def _patch_grid(block: nn.Module, hw: tuple[int, int]) -> tuple[int, int, int, int, bool]:
    """(patch_h, patch_w, patches along H, patches along W, whether the map is resized to fit) of a MobileViT block."""
    ph, pw = block.patch_size
    nh, nw = math.ceil(hw[0] / ph), math.ceil(hw[1] / pw)
    return ph, pw, nh, nw, (nh * ph, nw * pw) != tuple(hw)


class StaticMobileVitBlock(nn.Module):
    """timm ``MobileVitBlock`` with the unfold / fold shapes fixed at build time.

    The original reads ``x.shape`` and branches on it (interpolate only when
    the feature map is not a multiple of the patch size), which ``torch.fx``
    cannot trace. Here the spatial size is fixed (batch stays dynamic via
    ``-1``) and the same reshape / transpose sequence is applied, so the
    output is identical.
    """

    def __init__(self, block: nn.Module, hw: tuple[int, int]):
        super().__init__()
        self.conv_kxk, self.conv_1x1 = block.conv_kxk, block.conv_1x1
        self.transformer, self.norm = block.transformer, block.norm
        self.conv_proj, self.conv_fusion = block.conv_proj, block.conv_fusion
        self.patch_h, self.patch_w, self.n_h, self.n_w, self.interpolate = _patch_grid(block, hw)
        self.dim = block.conv_1x1.out_channels
        self.h, self.w = hw
        self.new_h, self.new_w = self.n_h * self.patch_h, self.n_w * self.patch_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        ph, pw, nh, nw, c = self.patch_h, self.patch_w, self.n_h, self.n_w, self.dim
        if self.interpolate:
            x = F.interpolate(x, size=(self.new_h, self.new_w), mode="bilinear", align_corners=False)
        # unfold: [B, C, H, W] -> [B*C*nh, nw, ph, pw] -> [B*P, N, C]
        x = x.reshape(-1, ph, nw, pw).transpose(1, 2)
        x = x.reshape(-1, c, nh * nw, ph * pw).transpose(1, 3).reshape(-1, nh * nw, c)
        x = self.norm(self.transformer(x))
        # fold: [B*P, N, C] -> [B, C, H, W]
        x = x.reshape(-1, ph * pw, nh * nw, c).transpose(1, 3).reshape(-1, nw, ph, pw)
        x = x.transpose(1, 2).reshape(-1, c, nh * ph, nw * pw)
        if self.interpolate:
            x = F.interpolate(x, size=(self.h, self.w), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class StaticMobileVitV2Block(nn.Module):
    """timm ``MobileVitV2Block`` (separable linear attention) with static unfold / fold shapes.

    Same reshape / permute sequence as timm's non-CoreML path, shapes fixed
    for the block's input size (batch free), so the output is identical.
    """

    def __init__(self, block: nn.Module, hw: tuple[int, int]):
        super().__init__()
        self.conv_kxk, self.conv_1x1 = block.conv_kxk, block.conv_1x1
        self.transformer, self.norm, self.conv_proj = block.transformer, block.norm, block.conv_proj
        self.patch_h, self.patch_w, self.n_h, self.n_w, self.interpolate = _patch_grid(block, hw)
        self.dim = block.conv_1x1.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw, nh, nw, c = self.patch_h, self.patch_w, self.n_h, self.n_w, self.dim
        if self.interpolate:
            x = F.interpolate(x, size=(nh * ph, nw * pw), mode="bilinear", align_corners=True)
        x = self.conv_1x1(self.conv_kxk(x))
        # unfold: [B, C, H, W] -> [B, C, P, N]
        x = x.reshape(-1, c, nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4).reshape(-1, c, ph * pw, nh * nw)
        x = self.norm(self.transformer(x))
        # fold: [B, C, P, N] -> [B, C, H, W]
        x = x.reshape(-1, c, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(-1, c, nh * ph, nw * pw)
        return self.conv_proj(x)


class ExplicitAttention(nn.Module):
    """timm ``Attention`` with a fixed token count and explicit q·kᵀ, softmax, attn·v.

    Fused scaled-dot-product attention hides the two matmuls from quantizers;
    this spells them out (``torch.matmul``) exactly as timm's non-fused path.
    """

    def __init__(self, attn: nn.Module, tokens: int):
        super().__init__()
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
            raise ValueError("only plain timm Attention (no qk/scale norm, no gate) is supported")
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.tokens = tokens

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        n, h, d = self.tokens, self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(-1, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = torch.matmul(q, k.transpose(-2, -1))
        attn = torch.softmax(attn, dim=-1)
        x = torch.matmul(attn, v)
        x = x.transpose(1, 2).reshape(-1, n, h * d)
        return self.proj(x)


def _plain_bn_act(m: nn.Module) -> nn.Module:
    """timm ``BatchNormAct2d`` -> ``Sequential(BatchNorm2d, act)`` (tools recognise conv + BN)."""
    bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    bn.load_state_dict(m.state_dict(), strict=False)
    act = m.act if hasattr(m, "act") else nn.Identity()
    return nn.Sequential(bn, act) if not isinstance(act, nn.Identity) else bn


def traceable(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """A copy of a timm MobileViT (v1 or v2) that ``torch.fx.symbolic_trace`` can trace, same output.

    MobileViT blocks get static shapes for ``input_size`` (C, H, W), attention
    is spelled out, timm's ``BatchNormAct2d`` becomes ``BatchNorm2d`` + act and
    in-place SiLU becomes out-of-place. Works for other timm nets built from
    the same parts; the batch size stays free.
    """
    from timm.layers import Attention
    from timm.layers.norm_act import BatchNormAct2d
    from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block

    model = copy.deepcopy(model).eval()
    # spatial size at the input of every MobileViT block, and tokens at every attention
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            sizes[name] = tuple(args[0].shape)
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, (MobileVitBlock, MobileVitV2Block, Attention))]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()

    def replace(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, MobileVitBlock):
                new = StaticMobileVitBlock(child, sizes[full][2:4])
            elif isinstance(child, MobileVitV2Block):
                new = StaticMobileVitV2Block(child, sizes[full][2:4])
            elif isinstance(child, Attention):
                new = ExplicitAttention(child, sizes[full][1])
            elif isinstance(child, BatchNormAct2d):
                new = _plain_bn_act(child)
            elif isinstance(child, nn.SiLU) and child.inplace:
                new = nn.SiLU()
            else:
                new = child
            if new is not child:
                setattr(parent, name, new)
            replace(new, f"{full}.")

    replace(model, "")
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d that directly follows a Conv2d folded into it.

    Covers timm's ``ConvNormAct`` (``conv`` then ``bn``, where :func:`traceable`
    made ``bn`` a ``BatchNorm2d`` or ``Sequential(BatchNorm2d, act)``) and
    adjacent pairs inside an ``nn.Sequential``. For tools that quantize
    modules one by one and do not fold BN themselves, so that they quantize
    the deployed (folded) conv weights.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.Sequential) and isinstance(bn[0], nn.BatchNorm2d):
            module.conv, bn[0] = fuse_conv_bn_eval(conv, bn[0]), nn.Identity()
        elif isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv, module.bn = fuse_conv_bn_eval(conv, bn), nn.Identity()
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(module[i], module[i + 1]), nn.Identity()
    return model


# --------------------------------------------------------------------------- evaluation and result cells


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Top-1 class ids of ``fn`` over ``images`` (in batches)."""
    if isinstance(fn, nn.Module):
        try:
            fn.eval()
        except NotImplementedError:  # exported programs refuse .eval(); they are in eval mode already
            pass
    out = [torch.as_tensor(fn(x)).float().argmax(dim=1) for x in images.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def cell(tool: str, version: str, wbits: int, abits: int, pot: bool, config: str, **fields: Any) -> dict[str, Any]:
    """One result cell (every key present, unused ones None)."""
    row = {"tool": tool, "version": version, "wbits": wbits, "abits": abits, "scales": "pot" if pot else "float",
           "config": config, "quant_top1": None, "agreement_fp32": None, "quantize_seconds": None,
           "eval_images": None, "calib_images": None, "error": None}
    row.update(fields)
    return row


def quantize_and_evaluate(tool: str, version: str, config: str, wbits: int, abits: int, pot: bool,
                          quantize: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
                          calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                          fp32_predictions: torch.Tensor | None = None,
                          float_model: nn.Module | None = None,
                          modules: tuple[str, ...] = (),
                          setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run ``quantize()`` (timed), evaluate what it returns and build the cell; errors become cells.

    ``quantize`` returns the tool's own quantized model (or a callable on a
    batch of images). ``modules`` are imported and ``setup()`` is run first,
    outside the timing (some tools compile kernels on import or first use). Agreement is with
    ``fp32_predictions``, else with ``float_model``'s predictions.
    """
    base = {"calib_images": int(calib.shape[0]), "eval_images": int(images.shape[0])}
    try:
        for name in modules:
            importlib.import_module(name)
        if setup is not None:
            setup()
        seed_everything()
        t = time.perf_counter()
        qmodel = quantize()
        seconds = time.perf_counter() - t
        preds = predict(qmodel, images)
    except Exception as exc:  # any tool failure is a result, not a crash
        where = [f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}"
                 for f in traceback.extract_tb(exc.__traceback__)[-3:]]
        return cell(tool, version, wbits, abits, pot, config, error=one_line(exc), where=where, **base)
    if fp32_predictions is None and float_model is not None:
        fp32_predictions = predict(float_model, images)
    top1 = int((preds == labels).sum()) / max(len(labels), 1)
    agree = int((preds == fp32_predictions).sum()) / max(len(preds), 1) if fp32_predictions is not None else None
    return cell(tool, version, wbits, abits, pot, config, quant_top1=top1, agreement_fp32=agree,
                quantize_seconds=round(seconds, 2), **base)


def unsupported(tool: str, version: str, wbits: int, abits: int, pot: bool, config: str, why: str) -> dict[str, Any]:
    """The cell of a setting the tool cannot express."""
    return cell(tool, version, wbits, abits, pot, config, error=one_line(Unsupported(why)))


def package_version(dist: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"

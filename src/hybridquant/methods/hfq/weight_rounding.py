"""Weight rounding optimisation (GPTQ-style) for a fixed per-channel scale grid.

Round-to-nearest quantizes each weight on its own. Here the columns of a
layer's weight (input features, or conv taps) are quantized one at a time
and each column's rounding error is compensated on the not-yet-quantized
columns through the inverse of H = E[x xᵀ], the input autocorrelation on
calibration data (Frantar et al., GPTQ). The output is still integer codes on
the same power-of-two grid: nothing is added to the integer program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...graph.ir import Node
from ...qparams import QParams
from ..scaling import is_depthwise

DAMP = 0.01
MAX_COLUMNS = 4096  # inputs wider than this keep round-to-nearest


def _patches(node: Node, x: torch.Tensor) -> torch.Tensor:
    """Layer input as columns: [K, N] (dense) or [C, k·k, N] (depthwise)."""
    if node.op == "linear":
        return x.reshape(-1, x.shape[-1]).t()
    a = node.attrs
    w = node.params["weight"]
    cols = F.unfold(x, w.shape[-2:], a["dilation"], a["padding"], a["stride"])  # [B, Cin·kh·kw, L]
    if is_depthwise(node):
        c = x.shape[1]
        return cols.reshape(x.shape[0], c, -1, cols.shape[-1]).permute(1, 2, 0, 3).flatten(2)
    return cols.permute(1, 0, 2).flatten(1)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    damp = DAMP * diag.mean(-1, keepdim=True).clamp_min(1e-8)
    h = h + torch.diag_embed(damp.expand_as(diag))
    chol = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _quant_col(w: torch.Tensor, scale: torch.Tensor, qp: QParams) -> torch.Tensor:
    return torch.clamp(torch.floor(w / scale + 0.5), qp.qmin, qp.qmax) * scale


@torch.no_grad()
def gptq_weight(node: Node, x: torch.Tensor, qp: QParams, max_samples: int = 65536) -> torch.Tensor | None:
    """Dequantized weight whose codes minimise ‖(W − Ŵ) x‖ greedily; ``None`` when not applicable."""
    w = node.params["weight"].double()
    cols = _patches(node, x).double()
    if cols.shape[-1] > max_samples:
        idx = torch.randperm(cols.shape[-1], generator=torch.Generator().manual_seed(0))[:max_samples]
        cols = cols[..., idx]
    scale = qp.scale.double()
    if is_depthwise(node):
        if w.shape[0] != x.shape[1]:
            return None  # channel multiplier > 1: keep round-to-nearest
        wm = w.flatten(1).clone()  # [C, k·k]
        h = cols @ cols.transpose(-1, -2) / cols.shape[-1]  # [C, kk, kk]
        hinv = _inverse_cholesky(h)
        out = torch.empty_like(wm)
        for j in range(wm.shape[1]):
            q = _quant_col(wm[:, j], scale, qp)
            err = (wm[:, j] - q) / hinv[:, j, j]
            wm[:, j:] -= err[:, None] * hinv[:, j, j:]
            out[:, j] = q
        return out.reshape(w.shape).float()
    wm = w.flatten(1).clone()  # [Cout, K]
    if wm.shape[1] > MAX_COLUMNS:
        return None
    h = cols @ cols.t() / cols.shape[-1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wm[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True)  # most active inputs first
    wm, h = wm[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)
    out = torch.empty_like(wm)
    for j in range(wm.shape[1]):
        q = _quant_col(wm[:, j], scale, qp)
        err = (wm[:, j] - q) / hinv[j, j]
        wm[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        out[:, j] = q
    out = out[:, torch.argsort(perm)]
    return out.reshape(w.shape).float()

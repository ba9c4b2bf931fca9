"""Top-1 / top-5 evaluation of a classifier over a DataLoader, and the paired interval of an accuracy drop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@dataclass
class EvalResult:
    """Accuracy and speed of one evaluation; ``predictions`` are top-1 class ids."""

    top1: float
    top5: float
    images: int
    seconds: float
    predictions: torch.Tensor = field(repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        """The JSON-ready fields (fractions in 0..1)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Run ``model`` over ``loader`` and count top-1 / top-5 hits.

    Top-1 is ``argmax`` (the first of tied logits), the rule every evaluator in
    hybridquant uses — ties are common in quantized logits, and ``topk`` does
    not promise an order among them."""
    if isinstance(model, nn.Module):
        model.eval()
    hit1 = hit5 = n = 0
    preds = []
    start = time.perf_counter()
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=2):
        logits = model(x.to(device)).float().cpu()
        k = min(5, logits.shape[1])
        pred = logits.argmax(1)
        top = logits.topk(k, dim=1).indices
        hit1 += (pred == y).sum().item()
        hit5 += ((top == y[:, None]).any(dim=1) | (pred == y)).sum().item()
        n += len(y)
        preds.append(pred)
    seconds = time.perf_counter() - start
    predictions = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return EvalResult(hit1 / max(n, 1), hit5 / max(n, 1), n, seconds, predictions)


#: standard errors either side of the drop for its two-sided 95 % interval (normal approximation)
Z_95 = 1.96


def paired_drop(fp32_correct: torch.Tensor, quant_correct: torch.Tensor) -> dict[str, Any]:
    """The top-1 drop (points) of a quantized model against FP32 on the same images, with its interval.

    Only the images that one model gets right and the other wrong carry the difference: with ``b`` of them
    right for FP32 alone and ``c`` for the quantized model alone, out of ``n``, the drop is 100·(b − c)/n and
    its standard error that of the mean per-image difference, 100·sqrt(b + c − (b − c)²/n)/n; the interval is
    drop ± :data:`Z_95` standard errors. It is the sampling error of the evaluation
    images only: the same model on another n images would land in it 95 % of the time. Another calibration
    draw is another model and moves the drop too. Returns the report's fields.
    """
    if fp32_correct.shape != quant_correct.shape or fp32_correct.dim() != 1:
        raise ValueError("paired_drop needs two 1-D hit masks over the same images")
    n = fp32_correct.numel()
    b = int((fp32_correct & ~quant_correct).sum())
    c = int((quant_correct & ~fp32_correct).sum())
    if n == 0:
        return {"fp32_only_correct": 0, "quant_only_correct": 0, "drop_se_pp": 0.0, "drop_ci95_pp": [0.0, 0.0]}
    drop = 100.0 * (b - c) / n
    se = 100.0 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {"fp32_only_correct": b, "quant_only_correct": c, "drop_se_pp": round(se, 4),
            "drop_ci95_pp": [round(drop - Z_95 * se, 4), round(drop + Z_95 * se, 4)]}

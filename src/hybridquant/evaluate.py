"""Top-1 / top-5 evaluation of a classifier over a DataLoader."""

from __future__ import annotations

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

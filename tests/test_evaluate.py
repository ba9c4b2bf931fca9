"""Evaluation in one process (:func:`evaluate`, :func:`evaluate_sharded`) and the paired interval of an
accuracy drop (:func:`hybridquant.evaluate.paired_drop`). ``tests/test_distributed.py`` runs the sharded
evaluation under torchrun."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridquant.data import make_loader
from hybridquant.evaluate import evaluate, evaluate_sharded, paired_drop


def _tied_model(x: torch.Tensor) -> torch.Tensor:
    """Logits on a coarse grid, so that ties are common, as with a quantized model."""
    return (x.flatten(1)[:, :7] * 2).round()


def test_sharded_evaluation_in_one_process_is_evaluate():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(23, 3, 4, 4, generator=gen), torch.randint(0, 7, (23,), generator=gen)
    dataset = torch.utils.data.TensorDataset(images, labels)
    ref = evaluate(_tied_model, make_loader(dataset, 4, 0), progress=False)
    got = evaluate_sharded(_tied_model, dataset, 5, 0, progress=False)
    assert (got.top1, got.top5, got.images) == (ref.top1, ref.top5, 23)
    assert torch.equal(got.predictions, ref.predictions)
    assert 0 < ref.top1 < ref.top5 < 1
    assert got.summary(predictions=True)["predictions"] == ref.predictions.tolist()
    assert "predictions" not in got.summary()


def _masks(ref: list[bool], quant: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(ref, dtype=torch.bool), torch.tensor(quant, dtype=torch.bool)


def test_counts_and_standard_error_by_hand():
    # 10 images: FP32 alone right on 3, the quantized model alone on 1, both right on 4, both wrong on 2
    ref, quant = _masks([1, 1, 1, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    p = paired_drop(ref, quant)
    assert (p["fp32_only_correct"], p["quant_only_correct"]) == (3, 1)
    se = 100 * math.sqrt(3 + 1 - (3 - 1) ** 2 / 10) / 10  # 18.97 points
    assert p["drop_se_pp"] == pytest.approx(se, abs=1e-4)
    assert p["drop_ci95_pp"] == pytest.approx([20 - 1.96 * se, 20 + 1.96 * se], abs=1e-4)


def test_identical_hits_give_a_zero_width_interval():
    ref = torch.tensor([True, False, True, True])
    assert paired_drop(ref, ref.clone()) == {"fp32_only_correct": 0, "quant_only_correct": 0, "drop_se_pp": 0.0,
                                            "drop_ci95_pp": [0.0, 0.0]}


def test_mismatched_masks_are_an_error():
    with pytest.raises(ValueError, match="same images"):
        paired_drop(torch.ones(4, dtype=torch.bool), torch.ones(5, dtype=torch.bool))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_interval_is_the_standard_error_of_the_per_image_difference(pairs):
    ref, quant = _masks([a for a, _ in pairs], [b for _, b in pairs])
    p = paired_drop(ref, quant)
    d = ref.double() - quant.double()  # +1, 0 or -1 per image
    drop = 100 * float(d.mean())
    se = 100 * float(d.std(unbiased=False)) / math.sqrt(len(pairs))
    assert p["drop_se_pp"] == pytest.approx(se, abs=1e-4)
    lo, hi = p["drop_ci95_pp"]
    assert lo == pytest.approx(drop - 1.96 * se, abs=2e-4) and hi == pytest.approx(drop + 1.96 * se, abs=2e-4)
    assert lo <= drop + 1e-4 and drop - 1e-4 <= hi


def test_interval_covers_the_true_drop_about_95_percent_of_the_time():
    # images drawn from a population where FP32 alone is right 4 % of the time and the quantized model
    # alone 3 %: the true drop is 1 point; 400 evaluations of 2,000 images each
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(400):
        u = torch.rand(2000, generator=gen)
        ref = (u < 0.04) | (u >= 0.07) & (u < 0.85)  # 78 % both right
        quant = (u >= 0.04) & (u < 0.85)
        lo, hi = paired_drop(ref, quant)["drop_ci95_pp"]
        covered += lo <= 1.0 <= hi
    assert 0.92 <= covered / 400 <= 0.98

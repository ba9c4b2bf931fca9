"""Brevitas layerwise post-training quantization with power-of-two (fixed-point) scales.

Config: BatchNorm folded into the convs, then
``brevitas.graph.quantize.layerwise_quantize`` (the fx backend fails on
MobileViT: "Residual handler could not find a solution to align scale
factors across ADDs and CATs"). Layerwise quantizes what every Conv2d and
Linear reads: its input (signed per-tensor, scale from the 99.999th
percentile seen in ``calibration_mode``) and its weight (narrow-range
signed, per output channel, scale from the max), bias int32; the attention
matmuls, adds, SiLU, softmax and LayerNorm stay float. ``pot``: Brevitas'
fixed-point quantizers (``Int8ActPerTensorFixedPoint``,
``Int8WeightPerChannelFixedPoint``: scales restricted to 2^k); ``float``:
their float-scale twins (``Int8ActPerTensorFloat``,
``Int8WeightPerChannelFloat``). Bit widths are set with ``.let(bit_width=)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import fold_batchnorm, package_version, quantize_and_evaluate, traceable

TOOL = "brevitas"


def _layer_map(wbits: int, abits: int, pot: bool) -> dict:
    import brevitas.nn as qnn
    from brevitas.quant.fixed_point import Int8ActPerTensorFixedPoint, Int8WeightPerChannelFixedPoint
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int32Bias

    act = (Int8ActPerTensorFixedPoint if pot else Int8ActPerTensorFloat).let(bit_width=abits)
    weight = (Int8WeightPerChannelFixedPoint if pot else Int8WeightPerChannelFloat).let(bit_width=wbits)
    kw = {"input_quant": act, "weight_quant": weight, "bias_quant": Int32Bias, "return_quant_tensor": False}
    return {torch.nn.Conv2d: (qnn.QuantConv2d, kw), torch.nn.Linear: (qnn.QuantLinear, kw)}


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with Brevitas layerwise PTQ at W``wbits``A``abits`` and evaluate it."""
    version = package_version("brevitas")
    kind = "FixedPoint (2^k)" if pot else "Float"
    desc = (f"layerwise_quantize (BN folded); Conv2d/Linear inputs Int{abits}ActPerTensor{kind.split()[0]} "
            f"(percentile), weights Int{wbits}WeightPerChannel{kind.split()[0]}, Int32Bias; matmul/add/softmax/LN/SiLU float")

    def quantize():
        from brevitas.graph.calibrate import calibration_mode
        from brevitas.graph.quantize import layerwise_quantize

        net = fold_batchnorm(traceable(model, tuple(images.shape[1:])))
        qnet = layerwise_quantize(net, compute_layer_map=_layer_map(wbits, abits, pot)).eval()
        with torch.no_grad(), calibration_mode(qnet):
            for x in calib.split(32):
                qnet(x)
        return qnet.eval()

    return quantize_and_evaluate(TOOL, version, desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model, modules=("brevitas.graph.quantize",))

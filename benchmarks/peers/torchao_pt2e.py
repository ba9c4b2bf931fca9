"""torchao PT2E static post-training quantization (X86InductorQuantizer).

Config: ``torch.export`` of the fx-traceable model (batch dimension
dynamic), ``prepare_pt2e`` with ``X86InductorQuantizer``, calibration on the
calibration images, ``convert_pt2e``; the converted reference model (float
ops between quantize/dequantize pairs) is what gets evaluated. The x86
recipe quantizes conv, linear, the attention matmuls and int8-in/int8-out
ops around them (add, cat, pooling); SiLU, softmax and LayerNorm stay float.
Activations: per-tensor affine uint8 with a histogram observer; weights:
per-channel symmetric int8 with min-max — torchao's default x86 config. Other
bit widths reuse that config with narrowed ``quant_min``/``quant_max``
(activations [0, 2^a - 1], weights [-2^(w-1), 2^(w-1) - 1]), which the
QuantizationSpec allows. PT2E observers have no power-of-two scale option,
so the ``pot`` cells are recorded as unsupported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .common import package_version, quantize_and_evaluate, traceable, unsupported

TOOL = "torchao"


def _config(wbits: int, abits: int):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    cfg = get_default_x86_inductor_quantization_config()
    if (wbits, abits) == (8, 8):
        return cfg
    act = dataclasses.replace(cfg.input_activation, quant_min=0, quant_max=2**abits - 1)
    weight = dataclasses.replace(cfg.weight, quant_min=-(2 ** (wbits - 1)), quant_max=2 ** (wbits - 1) - 1)
    return dataclasses.replace(cfg, input_activation=act, output_activation=act, weight=weight)


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with PT2E + X86InductorQuantizer at W``wbits``A``abits`` and evaluate it."""
    version = package_version("torchao")
    desc = (f"PT2E X86InductorQuantizer, act uint8-range [0,{2**abits - 1}] per-tensor affine (histogram), "
            f"weight [-{2 ** (wbits - 1)},{2 ** (wbits - 1) - 1}] per-channel symmetric (min-max), float scales")
    if pot:
        return unsupported(TOOL, version, wbits, abits, pot, desc, "PT2E observers have no power-of-two scale option")

    def quantize():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

        net = traceable(model, tuple(images.shape[1:]))
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(net, (calib[:2],), dynamic_shapes=({0: batch},)).module()
        quantizer = X86InductorQuantizer().set_global(_config(wbits, abits))
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x in calib.split(32):
                prepared(x)
        return convert_pt2e(prepared)

    return quantize_and_evaluate(TOOL, version, desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model, modules=("torchao.quantization.pt2e.quantize_pt2e",))

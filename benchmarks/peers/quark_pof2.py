"""AMD Quark (PyTorch, eager mode) post-training quantization with ``pof2`` scales.

Config: BatchNorm folded into the convs, then ``ModelQuantizer`` in eager
mode, which swaps every Conv2d / Linear for Quark's QuantConv2d /
QuantLinear and quantizes its input (per-tensor symmetric, MSE observer)
and its weight (per-channel symmetric); the attention matmuls, adds, SiLU,
softmax and LayerNorm stay float. ``pot``: ``ScaleType.pof2`` with Quark's
power-of-two observers (``PerTensorPowOf2MinMSEObserver`` for inputs,
``PerChannelPowOf2MinMSEObserver`` for weights: the exponent with the least
quantization MSE, as in Quark's NPU recipe — ``scale_type`` alone does not
round scales); ``float``: ``ScaleType.float`` with ``PerTensorMSEObserver``
and ``PerChannelMinMaxObserver``.
Quark's integer types are int8/uint8, int4/uint4, int3, int2 — there is no
6-bit type, so W6A6 is recorded as unsupported. Graph (fx) mode is not used:
its NPU pre-quantization passes rewrite SiLU into hardswish
(x·hardsigmoid(x)), which changes the float model.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import fold_batchnorm, package_version, quantize_and_evaluate, traceable, unsupported

TOOL = "quark"
_TYPES = {8: "int8", 4: "int4"}


def _qconfig(wbits: int, abits: int, pot: bool):
    from quark.torch.quantization.config.config import QConfig, QLayerConfig, QTensorConfig
    from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType
    from quark.torch.quantization.observer import observer as obs

    # scale_type pof2 only takes effect through Quark's PowOf2 observers
    act_obs = obs.PerTensorPowOf2MinMSEObserver if pot else obs.PerTensorMSEObserver
    w_obs = obs.PerChannelPowOf2MinMSEObserver if pot else obs.PerChannelMinMaxObserver
    scale = ScaleType.pof2 if pot else ScaleType.float
    common = {"symmetric": True, "scale_type": scale, "round_method": RoundType.half_even, "is_dynamic": False}
    act = QTensorConfig(dtype=getattr(Dtype, _TYPES[abits]), observer_cls=act_obs, qscheme=QSchemeType.per_tensor, **common)
    weight = QTensorConfig(dtype=getattr(Dtype, _TYPES[wbits]), observer_cls=w_obs, qscheme=QSchemeType.per_channel,
                           ch_axis=0, **common)
    return QConfig(global_quant_config=QLayerConfig(input_tensors=act, weight=weight), log_severity_level=3)


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with Quark eager-mode PTQ at W``wbits``A``abits`` and evaluate it."""
    version = package_version("amd-quark")
    obs = "PowOf2MinMSE observers, scale_type pof2" if pot else "MSE / min-max observers, scale_type float"
    desc = (f"ModelQuantizer eager mode (BN folded); Conv2d/Linear inputs int{abits} per-tensor symmetric, "
            f"weights int{wbits} per-channel symmetric, {obs}; matmul/add/softmax/LN/SiLU float")
    if wbits not in _TYPES or abits not in _TYPES:
        return unsupported(TOOL, version, wbits, abits, pot, desc,
                           f"Quark has no int{wbits if wbits not in _TYPES else abits} integer type "
                           "(int8/uint8, int4/uint4, int3, int2)")

    def quantize():
        from quark.torch import ModelQuantizer
        from torch.utils.data import DataLoader

        net = fold_batchnorm(traceable(model, tuple(images.shape[1:])))
        quantizer = ModelQuantizer(_qconfig(wbits, abits, pot))
        qnet = quantizer.quantize_model(net, DataLoader(calib, batch_size=32))
        return qnet.eval()

    return quantize_and_evaluate(TOOL, version, desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model, modules=("quark.torch",))

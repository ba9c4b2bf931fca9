"""Sony Model Compression Toolkit (MCT) post-training quantization with power-of-two thresholds.

Config: ``mct.ptq.pytorch_post_training_quantization`` on the fx-traceable
model (MCT reads the model with ``torch.fx``) with its default
``CoreConfig`` (MSE threshold search, BN folding, shift-negative correction
off by default) and a TargetPlatformCapabilities built with MCT's IMX500 v1
generator (its operator sets and fusing patterns) from edited op configs:
kernel weights ``wbits`` per-channel, activations ``abits`` at the output of
every quantized op (conv/linear/add/matmul/softmax/LayerNorm/SiLU...;
reshapes, permutes and dropout pass through). ``pot``: weights and
activations ``QuantizationMethod.POWER_OF_TWO`` (thresholds 2^k);
``float``: both ``SYMMETRIC`` (float thresholds). MCT's own default TPC
(IMX500) mixes the two: power-of-two activations, symmetric weights.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import package_version, quantize_and_evaluate, traceable

TOOL = "mct"


def _tpc(wbits: int, abits: int, pot: bool):
    from mct_quantizers import QuantizationMethod
    from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import (
        tpc as imx500,
    )

    method = QuantizationMethod.POWER_OF_TWO if pot else QuantizationMethod.SYMMETRIC
    linear, _, default = imx500.get_op_quantization_configs()
    act = {"activation_n_bits": abits, "supported_input_activation_n_bits": (abits,), "activation_quantization_method": method}
    kernel = {KERNEL_ATTR: {"weights_n_bits": wbits, "weights_quantization_method": method}}
    linear = linear.clone_and_edit(attr_to_edit=kernel, **act)
    default = default.clone_and_edit(**act)
    return imx500.generate_tpc(default_config=default, base_config=linear, mixed_precision_cfg_list=[linear],
                               name=f"imx500_w{wbits}a{abits}_{'pot' if pot else 'float'}")


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with MCT PTQ at W``wbits``A``abits`` and evaluate it."""
    version = package_version("model-compression-toolkit")
    method = "POWER_OF_TWO" if pot else "SYMMETRIC"
    desc = (f"pytorch_post_training_quantization, default CoreConfig (MSE thresholds); IMX500-v1 op sets with "
            f"kernels {wbits}-bit per-channel and every op output {abits}-bit, {method} for both")

    def quantize():
        import model_compression_toolkit as mct

        net = traceable(model, tuple(images.shape[1:]))

        def representative_data():
            for x in calib.split(32):
                yield [x]

        qnet, _ = mct.ptq.pytorch_post_training_quantization(
            net, representative_data, core_config=mct.core.CoreConfig(),
            target_platform_capabilities=_tpc(wbits, abits, pot))
        return qnet.eval()

    return quantize_and_evaluate(TOOL, version, desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model, modules=("model_compression_toolkit",))

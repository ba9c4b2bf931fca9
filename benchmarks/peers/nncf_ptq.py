"""NNCF post-training quantization (``nncf.quantize``, PyTorch backend).

Config: ``nncf.quantize`` on the fx-traceable model with every calibration
image as one sample (``subset_size`` = all of them), ``target_device CPU``
and ``model_type TRANSFORMER`` (NNCF's recipe for models with attention:
mixed preset — symmetric weights, asymmetric activations —, SmoothQuant
on the linear layers, quantized matmuls, softmax/LayerNorm inputs left
float) plus its default fast bias correction; weights per channel,
activations per tensor, float scales (NNCF has no power-of-two scale
option, so ``pot`` cells are recorded as unsupported). Other bit widths via
``AdvancedQuantizationParameters`` (``QuantizationParameters(num_bits=)``).
NNCF 3.4's CPU hardware config only lists 8- and 16-bit quantization
spaces and refuses anything else ("incompatible with HW capabilities"), so
below 8 bits every 8-bit space of the hardware config is widened, for this
call only, to also offer the requested bit width (same modes, granularity
and narrow-range options); the cell's config says so.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch

from .common import package_version, quantize_and_evaluate, traceable, unsupported

TOOL = "nncf"


@contextlib.contextmanager
def _widened_qspaces(bits: set[int]) -> Iterator[None]:
    """Let every 8-bit quantization space of NNCF's hardware configs also offer ``bits``."""
    from nncf.common.hardware.defines import QConfigSpace

    original = QConfigSpace.get_all_qconfigs

    def get_all_qconfigs(self):
        configs = original(self)
        if self.bits != 8:
            return configs
        extra = []
        for b in sorted(bits - {8}):
            for q in configs:
                q = copy.copy(q)
                q.num_bits = b
                extra.append(q)
        return configs + extra

    QConfigSpace.get_all_qconfigs = get_all_qconfigs
    try:
        yield
    finally:
        QConfigSpace.get_all_qconfigs = original


def _build_extension() -> None:
    # NNCF JIT-compiles its CPU fake-quantize kernels on first use with a 60 s limit,
    # too short on a small machine; build them up front (cached afterwards), untimed.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    import nncf.torch

    nncf.torch.force_build_cpu_extensions()


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with ``nncf.quantize`` at W``wbits``A``abits`` and evaluate it."""
    version = package_version("nncf")
    widened = (wbits, abits) != (8, 8)
    desc = (f"nncf.quantize, model_type TRANSFORMER (mixed preset, SmoothQuant, fast bias correction), "
            f"target_device CPU, weights {wbits}-bit per-channel, activations {abits}-bit per-tensor, float scales"
            + ("; CPU HW-config 8-bit qspaces widened to these bit widths" if widened else ""))
    if pot:
        return unsupported(TOOL, version, wbits, abits, pot, desc, "NNCF has no power-of-two scale option")

    def quantize():
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )

        net = traceable(model, tuple(images.shape[1:]))
        advanced = AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(num_bits=abits),
            weights_quantization_params=QuantizationParameters(num_bits=wbits))
        with _widened_qspaces({wbits, abits}) if widened else contextlib.nullcontext():
            qnet = nncf.quantize(net, nncf.Dataset(list(calib.split(1))), subset_size=len(calib),
                                 target_device=nncf.TargetDevice.CPU, model_type=nncf.ModelType.TRANSFORMER,
                                 advanced_parameters=advanced)
        return qnet.eval()

    return quantize_and_evaluate(TOOL, version, desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model, modules=("nncf",), setup=_build_extension)

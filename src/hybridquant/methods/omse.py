"""OMSE: each range is the one minimising the quantization MSE of the tensor.

Activations are searched per tensor on a random sample of calibration
values, weights per output channel, over clipping factors in (0.2, 1].
"""

from ..config import OMSEConfig
from .base import Method


class OMSE(Method):
    name = "omse"
    config_class = OMSEConfig
    act_range = "mse"
    weight_range = "mse"

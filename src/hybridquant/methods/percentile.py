"""Percentile PTQ: activation ranges clipped at a percentile (``--percentile``, default 99.99).

The percentile is estimated per calibration batch over all elements and
averaged across batches; weights keep min-max ranges.
"""

from ..config import PercentileConfig
from .base import Method


class Percentile(Method):
    name = "percentile"
    config_class = PercentileConfig
    act_range = "percentile"

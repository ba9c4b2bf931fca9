"""Min-max PTQ: every range from the extremes seen in calibration."""

from ..config import MinMaxConfig
from .base import Method


class MinMax(Method):
    """Per-tensor activation and per-channel weight ranges from min / max."""

    name = "minmax"
    config_class = MinMaxConfig

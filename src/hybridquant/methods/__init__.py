"""PTQ methods, one module each; ``METHODS`` maps CLI names to classes."""

from .base import Method
from .minmax import MinMax
from .omse import OMSE
from .percentile import Percentile

METHODS: dict[str, type[Method]] = {m.name: m for m in (MinMax, Percentile, OMSE)}

__all__ = ["METHODS", "Method"]

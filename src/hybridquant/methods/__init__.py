"""PTQ methods, one module each; ``METHODS`` maps CLI names to classes."""

from .base import Method
from .fqvit import FQViT
from .hfq import HFQ
from .hyq import HyQ
from .minmax import MinMax
from .omse import OMSE
from .percentile import Percentile
from .ptq4vit import PTQ4ViT
from .repqvit import RepQViT
from .smoothquant import SmoothQuant

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    MinMax, Percentile, OMSE, FQViT, SmoothQuant, HyQ, HFQ, PTQ4ViT, RepQViT,
)}

__all__ = ["METHODS", "Method"]

"""Graph capture and transforms: timm model -> explicit op graph (:class:`Graph`)."""

from .capture import capture
from .ir import Graph, Node

__all__ = ["Graph", "Node", "capture"]

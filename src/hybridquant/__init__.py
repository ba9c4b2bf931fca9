"""hybridquant: hardware-friendly post-training quantization for conv–attention hybrid networks."""

__version__ = "0.1.0"

"""Numeric kernels: GGML block quantizers (byte-identical to ggml's reference)."""
from .ggml_quants import QTYPES, block_info, dequantize, quantize

__all__ = ["QTYPES", "block_info", "dequantize", "quantize"]

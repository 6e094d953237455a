"""Small numpy helpers shared by the GGML quantizers (float32-exact)."""
from __future__ import annotations

import numpy as np

f32 = np.float32


def fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even) -> (uint16 bits, value back as float32)."""
    with np.errstate(over="ignore"):  # overflow -> inf, as in ggml
        h = np.asarray(v, dtype=np.float32).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def u16_bytes(bits: np.ndarray) -> np.ndarray:
    """(..., k) uint16 -> (..., 2k) little-endian bytes."""
    return np.ascontiguousarray(bits.astype("<u2")).view(np.uint8)


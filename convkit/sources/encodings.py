"""How one logical tensor is stored, and how to get its values back: the decoders of the view.

A :class:`Decoder` knows, for one logical weight, the stored tensor that holds its values
(``main``), the auxiliary tensors it needs (scales, absmax, quant state: ``aux``), and how to
turn stored bytes back into values. Decoders work on ranges of the flattened logical tensor
that are multiples of their ``granule`` (1 for element-wise encodings, the block size for block
formats, 0 when only the whole tensor can be decoded), so the engine streams a quantized input
in chunks exactly like a plain one.

Auxiliary tensors are read by the view (:mod:`convkit.sources.view`), passed through
:meth:`Decoder.prepare` once per tensor (e.g. double-quantized absmax is decoded there) and
handed to :meth:`Decoder.decode` with every range. Nothing here opens files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import dtypes

Aux = dict[str, torch.Tensor]


@dataclass
class Decoder:
    """Base class: the plain encoding (the stored bytes are the values)."""

    main: str                               # stored key holding the values
    shape: tuple[int, ...]                  # logical shape
    stored_dtype: str                       # safetensors dtype (or GGML type) of ``main``
    aux: tuple[str, ...] = ()               # stored keys consumed with it

    #: decodable range granularity in logical elements (0: whole tensor only)
    granule = 1
    #: a short name of the encoding family (inspect groups by it) and how users call it
    family = "plain"
    title = "plain"

    @property
    def label(self) -> str:
        """How it is stored, as plans and inspect show it ("F16", "F8_E4M3*scale", "Q4_K")."""
        return self.stored_dtype

    @property
    def dtype(self) -> str:
        """safetensors dtype of the decoded values."""
        return self.stored_dtype

    @property
    def lossy(self) -> bool:
        """True when the stored form is a quantization (values are approximations)."""
        return False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def direct(self) -> bool:
        """True when the stored bytes are the values (read straight into the caller's buffer)."""
        return type(self) is Decoder

    def stored_span(self, start: int, count: int) -> tuple[int, int]:
        """(byte offset, byte count) within ``main`` holding logical elements start:start+count."""
        isz = dtypes.itemsize(self.stored_dtype)
        return start * isz, count * isz

    def prepare(self, aux: Aux) -> Aux:
        """Turn the raw aux tensors into what :meth:`decode` uses (once per tensor)."""
        return aux

    def decode(self, raw: torch.Tensor, start: int, count: int, out: torch.Tensor,
               aux: Aux) -> None:
        """Decode ``raw`` (1-D uint8, exactly :meth:`stored_span` of the range) into ``out``
        (1-D, ``self.dtype``, ``count`` elements): logical elements start:start+count."""
        out.copy_(raw.view(dtypes.to_torch(self.stored_dtype)))

    def decode_whole(self, stored: torch.Tensor, aux: Aux) -> torch.Tensor:
        """The whole logical tensor from the whole stored ``main`` tensor and prepared aux."""
        raw = stored.contiguous().reshape(-1).view(torch.uint8)
        out = torch.empty(self.numel, dtype=dtypes.to_torch(self.dtype))
        if self.numel:
            self.decode(raw, 0, self.numel, out, aux)
        return out.reshape(self.shape)


class Float32Decoder(Decoder):
    """Encodings whose values come back as float32 (every quantized form)."""

    family = "quantized"
    title = "quantized"

    @property
    def dtype(self) -> str:
        return "F32"

    @property
    def lossy(self) -> bool:
        return True


class FP8(Float32Decoder):
    """Plain fp8 (``F8_E4M3`` / ``F8_E5M2``): the values are the fp8 numbers, no scale."""

    family = "fp8"
    title = "fp8"

    def decode(self, raw, start, count, out, aux) -> None:
        from ..kernels.dequant import fp8_decode

        fp8_decode(self.stored_dtype, raw.numpy(), out.numpy())


@dataclass
class ScaledFP8(Float32Decoder):
    """ComfyUI scaled fp8: ``w8.float() * scale``, scale per tensor (or per output row).

    ``form``: ``scale_weight`` (``scaled_fp8`` marker + ``<layer>.scale_weight``) or
    ``comfy_quant`` (``<layer>.weight_scale`` + ``<layer>.comfy_quant``)."""

    scale_key: str = ""
    form: str = "scale_weight"
    per_row: bool = False

    family = "fp8-scaled"
    title = "scaled fp8"

    @property
    def label(self) -> str:
        return f"{self.stored_dtype}*scale"

    @property
    def granule(self) -> int:
        return math.prod(self.shape[1:]) if self.per_row else 1

    def decode(self, raw, start, count, out, aux) -> None:
        from ..kernels.dequant import fp8_decode

        scale = aux[self.scale_key].float().reshape(-1)
        if not self.per_row:    # w8.float() * scale: one float32 product per value
            fp8_decode(self.stored_dtype, raw.numpy(), out.numpy(), float(scale[0]))
            return
        fp8_decode(self.stored_dtype, raw.numpy(), out.numpy())
        row = math.prod(self.shape[1:])
        r0 = start // row
        out.view(-1, row).mul_(scale[r0:r0 + count // row, None])


@dataclass
class ScaledInt8(Float32Decoder):
    """ComfyUI ``int8_tensorwise`` (``comfy_quant``): ``int8 * weight_scale`` (scalar)."""

    scale_key: str = ""

    family = "int8-scaled"
    title = "scaled int8"

    @property
    def label(self) -> str:
        return "I8*scale"

    def decode(self, raw, start, count, out, aux) -> None:
        out.copy_(raw.view(torch.int8))
        out.mul_(aux[self.scale_key].float().reshape(-1)[0])


@dataclass
class GGMLBlocks(Float32Decoder):
    """A GGUF tensor in a GGML block type (Q8_0, Q4_K, ...): blocks run along the flattened
    tensor (rows are whole blocks, and ComfyUI-GGUF's rearranged rows keep the flat order)."""

    family = "gguf"
    title = "GGUF"

    @property
    def block(self) -> tuple[int, int]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType[self.stored_dtype]]

    @property
    def granule(self) -> int:
        return self.block[0]

    def stored_span(self, start, count):
        bs, ts = self.block
        return start // bs * ts, -(-count // bs) * ts

    def decode(self, raw, start, count, out, aux) -> None:
        from ..kernels.dequant import ggml_decode

        ggml_decode(self.stored_dtype, raw.numpy(), out.numpy())


@dataclass
class BNB4(Float32Decoder):
    """bitsandbytes 4-bit (NF4 / FP4), as Forge and diffusers store it: ``<w>`` (packed uint8,
    two values per byte, high nibble first), ``<w>.absmax`` (float32 per block, or uint8 with
    ``nested_absmax`` / ``nested_quant_map`` when double-quantized), ``<w>.quant_map`` (the 16
    code values) and ``<w>.quant_state.bitsandbytes__<type>`` (JSON: quant_type, blocksize,
    dtype, shape, nested_*). Blocks run over the flattened tensor."""

    quant_type: str = "nf4"
    blocksize: int = 64
    state: dict | None = None

    family = "bnb4"
    title = "bitsandbytes 4-bit"

    @property
    def label(self) -> str:
        return self.quant_type + ("+dq" if self.state and "nested_blocksize" in self.state else "")

    @property
    def granule(self) -> int:
        return self.blocksize if self.blocksize % 2 == 0 else 2 * self.blocksize

    def stored_span(self, start, count):
        a = start // 2
        return a, (start + count + 1) // 2 - a

    def prepare(self, aux: Aux) -> Aux:
        """absmax as float32 (double quant: code2[absmax_u8] * nested_absmax + offset)."""
        w = self.main
        absmax = aux[w + ".absmax"]
        if absmax.dtype == torch.uint8:
            nb = int(self.state.get("nested_blocksize", 256))
            code2 = aux[w + ".nested_quant_map"].float()
            nabs = aux[w + ".nested_absmax"].float()
            idx = absmax.long()
            blocks = torch.arange(idx.numel()) // nb
            absmax = code2[idx] * nabs[blocks] + float(self.state.get("nested_offset", 0.0))
        return {"absmax": absmax.float().contiguous(),
                "code": aux[w + ".quant_map"].float().contiguous()}

    def decode(self, raw, start, count, out, aux) -> None:
        from ..kernels.dequant import bnb4_decode

        bnb4_decode(raw.numpy(), start, count, aux["code"].numpy(), aux["absmax"].numpy(),
                    self.blocksize, out.numpy())

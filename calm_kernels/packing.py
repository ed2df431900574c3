"""Bit packing shared by the kernels, the calm.nn modules and the on-disk format.

Uniform weights (out_features N x in_features K):
- codes are unsigned b-bit integers, b in {2, 3, 4, 8};
- each row's codes form one little-endian bit stream along K: code k occupies bits [k*b, (k+1)*b) of the
  row, stored in int32 words (word w holds bits [32w, 32w+32)). K is padded with zero codes to a multiple
  of PACK_ALIGN = 32, so a row takes exactly K_pad * b / 32 words and 3-bit codes waste no bits beyond
  that padding (a 3-bit code may straddle two words: codes 10 and 21 of every 32);
- scales: (N, K / group_size) float16; zeros: (N, K / group_size) uint8 integer zero points;
  w = (code - zero) * scale. Per-channel quantization is group_size == K.
"""
from __future__ import annotations

import torch

PACK_ALIGN = 32
SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: packed weights take one of {SUPPORTED_BITS}")


def padded_length(k: int) -> int:
    return -(-k // PACK_ALIGN) * PACK_ALIGN


def packed_words(k: int, bits: int) -> int:
    return padded_length(k) * bits // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (N, K) integer codes in [0, 2^bits) into (N, packed_words(K, bits)) int32 words."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    kp = padded_length(k)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    # Place every code at its bit offset in the row's stream; 64-bit lanes hold codes that straddle words.
    offsets = torch.arange(kp, device=c.device) * bits
    word = offsets // 32
    shift = offsets % 32
    nwords = kp * bits // 32
    lo = (c << shift) & 0xFFFFFFFF
    hi = c >> (32 - shift)  # nonzero only where the code straddles into the next word
    out = torch.zeros(n, nwords + 1, dtype=torch.int64, device=c.device)
    out.scatter_add_(1, word.expand(n, -1), lo)
    out.scatter_add_(1, (word + 1).expand(n, -1), torch.where(shift + bits > 32, hi, torch.zeros_like(hi)))
    out = out[:, :nwords]
    # Reinterpret unsigned 32-bit values as int32 two's complement.
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: (N, words) int32 -> (N, k) uint8 codes."""
    check_bits(bits)
    n, nwords = packed.shape
    if nwords != packed_words(k, bits):
        raise ValueError(f"packed tensor has {nwords} words per row; {k} codes at {bits} bits need "
                         f"{packed_words(k, bits)}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))
    offsets = torch.arange(k, device=packed.device) * bits
    word = offsets // 32
    shift = offsets % 32
    both = words[:, word] | (words[:, word + 1] << 32)
    return ((both >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def dequantize_uniform(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed uniform weights -> dense (N, k) weights in `dtype`: w = (code - zero) * scale per group."""
    codes = unpack_codes(packed, bits, k).to(torch.float32)
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    n = codes.shape[0]
    g = codes.view(n, k // group_size, group_size)
    w = (g - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(n, k).to(dtype)


def uniform_effective_bits(bits: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight: codes plus a float16 scale per group, plus a uint8 zero per group if asymmetric."""
    meta = 16 + (0 if symmetric else 8)
    return bits + meta / group_size

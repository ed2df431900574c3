"""Bit packing shared by the kernels, the calm.nn modules and the on-disk format.

Uniform weights (out_features N x in_features K):
- codes are unsigned b-bit integers, b in {2, 3, 4, 8};
- each row's codes form one little-endian bit stream along K: code k occupies bits [k*b, (k+1)*b) of the
  row, stored in int32 words (word w holds bits [32w, 32w+32)). K is padded with zero codes to a multiple
  of PACK_ALIGN = 32, so a row takes exactly K_pad * b / 32 words and 3-bit codes waste no bits beyond
  that padding (a 3-bit code may straddle two words: codes 10 and 21 of every 32);
- scales: (N, K / group_size) float16; zeros: (N, K / group_size) uint8 integer zero points;
  w = (code - zero) * scale. Per-channel quantization is group_size == K. A symmetric grid's zero point is
  the constant 2^(b-1): the kernels read it like any other, calm.nn does not save it;
- input_perm (optional, GPTQ act-order): (K,) `index_dtype(K)` (int16 up to 32767 columns, else int32);
  stored column s meets input column input_perm[s].

Codebook weights (CLAQ-style: one lookup table per input column, width b_j in {1, 2, 3, 4, 8} per column):
- the columns are stably sorted by width into contiguous slabs (`CodebookLayout.slabs`: (bits, columns) in
  ascending width); `perm` (K,) int32 maps stored column s to original column perm[s];
- codes: one (N, total_words) int32 tensor; slab i occupies words [word_offsets[i], word_offsets[i+1]) of
  every row, packed exactly like uniform codes (`pack_codes`), its column count padded to 32, so every slab
  starts on a word boundary and a 3-bit slab is dense;
- codebooks: one flat float16 vector; stored column s of slab i (local index j) owns the 2^b_i entries at
  codebook_offsets[i] + j * 2^b_i; w[n, perm[s]] = codebook[column s][code[n, s]];
- outliers (optional): CSR over output rows: rowptr (N + 1,) int32, cols (nnz,) original column indices
  (int16 when K <= 32767, else int32), values (nnz,) float16. The weight at an outlier position is the
  outlier value; the code stored there is ignored. Kernels add x[:, col] * (value - codebook value).

Kernel-ready form (not stored; made when a weight is prepared for the kernels, calm_kernels.qgemm): a 3-bit
stream becomes a 2-bit plane of the low bits followed by a 1-bit plane of the high bits (`split_3bit_planes`),
in the same words of the row, so the files keep the layout above and old files load unchanged.
"""
from __future__ import annotations

import dataclasses

import torch

PACK_ALIGN = 32
SUPPORTED_BITS = (2, 3, 4, 8)
# Codebook columns may also take 1 bit (two centroids); uniform grids stay at SUPPORTED_BITS.
CODEBOOK_BITS = (1, 2, 3, 4, 8)
_PACKABLE_BITS = CODEBOOK_BITS


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: packed weights take one of {SUPPORTED_BITS}")


def _check_packable(bits: int) -> None:
    if bits not in _PACKABLE_BITS:
        raise ValueError(f"unsupported bit width {bits}: codes pack at one of {_PACKABLE_BITS} bits")


def padded_length(k: int) -> int:
    return -(-k // PACK_ALIGN) * PACK_ALIGN


def packed_words(k: int, bits: int) -> int:
    return padded_length(k) * bits // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (N, K) integer codes in [0, 2^bits) into (N, packed_words(K, bits)) int32 words."""
    _check_packable(bits)
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
    _check_packable(bits)
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


def split_3bit_planes(packed: torch.Tensor, k: int, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Kernel-ready form of 3-bit codes, made when a weight is prepared for the kernels (never stored): the
    (N, packed_words(k, 3)) stream becomes the low two bits of every code packed as a 2-bit stream
    (packed_words(k, 2) words) followed by the high bits as a 1-bit stream (packed_words(k, 1) words), the same
    word count, so the kernels read aligned words instead of codes that straddle words. Rows go in chunks to
    bound the int64 temporaries."""
    if packed.shape[1] != packed_words(k, 3):
        raise ValueError(f"3-bit codes of {k} columns take {packed_words(k, 3)} words, got {packed.shape[1]}")
    parts = []
    for r in range(0, packed.shape[0], rows_per_chunk):
        codes = unpack_codes(packed[r:r + rows_per_chunk], 3, k)
        parts.append(torch.cat([pack_codes(codes & 3, 2), pack_codes(codes >> 2, 1)], 1))
    if not parts:
        return packed.clone()
    return torch.cat(parts, 0)


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


def index_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype the packed formats use for indices into n columns: int16 up to 32767, else int32."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def uniform_effective_bits(bits: int, group_size: int, symmetric: bool, in_features: int | None = None,
                           out_features: int | None = None, input_perm: bool = False) -> float:
    """Stored bits per weight of a uniform weight: codes (with the row padding to PACK_ALIGN when in_features is
    given), a float16 scale per group, a uint8 zero point per group if asymmetric (a symmetric grid's zero is
    the constant 2^(bits-1), not stored) and, with `input_perm`, one `index_dtype(in_features)` index per input
    column shared by the out_features rows. Equals calm.nn.UniformQuantLinear.effective_bits."""
    meta = 16 + (0 if symmetric else 8)
    code_bits = bits if in_features is None else bits * padded_length(in_features) / in_features
    if not input_perm:
        return code_bits + meta / group_size
    if in_features is None or out_features is None:
        raise ValueError("counting input_perm needs in_features and out_features")
    return code_bits + meta / group_size + torch.iinfo(index_dtype(in_features)).bits / out_features


# ----------------------------------------------------------------------------------------------------------
# Codebook weights
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CodebookLayout:
    """Where each slab of a codebook weight lives: `slabs` is ((bits, columns), ...) in stored order."""

    slabs: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not self.slabs:
            raise ValueError("a codebook layout needs at least one slab")
        for bits, cols in self.slabs:
            if bits not in CODEBOOK_BITS:
                raise ValueError(f"codebook slab width {bits} not supported: use one of {CODEBOOK_BITS}")
            if cols <= 0:
                raise ValueError(f"codebook slab of {bits} bits has {cols} columns; slabs must be non-empty")
        widths = [b for b, _ in self.slabs]
        if widths != sorted(set(widths)):
            raise ValueError(f"slab widths must be distinct and ascending, got {widths}")

    @property
    def in_features(self) -> int:
        return sum(c for _, c in self.slabs)

    @property
    def col_starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for _, c in self.slabs:
            out.append(acc)
            acc += c
        return tuple(out)

    @property
    def word_offsets(self) -> tuple[int, ...]:
        """Start word of each slab in a row, plus the row's total word count at the end."""
        out, acc = [0], 0
        for b, c in self.slabs:
            acc += packed_words(c, b)
            out.append(acc)
        return tuple(out)

    @property
    def codebook_offsets(self) -> tuple[int, ...]:
        """Start entry of each slab in the flat codebook vector, plus its total length at the end."""
        out, acc = [0], 0
        for b, c in self.slabs:
            acc += c << b
            out.append(acc)
        return tuple(out)

    @property
    def total_words(self) -> int:
        return self.word_offsets[-1]

    @property
    def codebook_length(self) -> int:
        return self.codebook_offsets[-1]

    def column_bits(self) -> torch.Tensor:
        """Width of every stored column (K,)."""
        return torch.cat([torch.full((c,), b, dtype=torch.int64, device="cpu") for b, c in self.slabs])


def outlier_col_dtype(in_features: int) -> torch.dtype:
    return index_dtype(in_features)


@dataclasses.dataclass
class PackedCodebook:
    """Every stored tensor of a codebook weight (see the module docstring for their meaning)."""

    layout: CodebookLayout
    qweight: torch.Tensor          # (N, total_words) int32
    codebooks: torch.Tensor        # (codebook_length,) float16
    perm: torch.Tensor             # (K,) int32
    outlier_rowptr: torch.Tensor | None = None  # (N + 1,) int32
    outlier_cols: torch.Tensor | None = None    # (nnz,) int16/int32, original column indices
    outlier_vals: torch.Tensor | None = None    # (nnz,) float16


def _check_codebook_parts(codes: torch.Tensor, centroids: torch.Tensor, column_bits: torch.Tensor) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if column_bits.dim() != 1 or column_bits.numel() != k:
        raise ValueError(f"column_bits must have one width per input column ({k}), got shape "
                         f"{tuple(column_bits.shape)}")
    bad = sorted(set(int(b) for b in column_bits.unique()) - set(CODEBOOK_BITS))
    if bad:
        raise ValueError(f"column widths {bad} not supported: use {CODEBOOK_BITS}")
    max_bits = int(column_bits.max()) if k else 1
    if centroids.dim() != 2 or centroids.shape[0] != k or centroids.shape[1] < (1 << max_bits):
        raise ValueError(f"centroids must be (in_features={k}, >= 2**max_bits={1 << max_bits}), got "
                         f"{tuple(centroids.shape)}")
    if not centroids.is_floating_point() or not torch.isfinite(centroids).all():
        raise ValueError("centroids must be finite floating-point values")
    limit = (1 << column_bits.to(torch.int64)).to(codes.device)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or bool((c >= limit.unsqueeze(0)).any())):
        raise ValueError("codes out of range: codes[:, j] must lie in [0, 2**column_bits[j])")


def pack_codebook(codes: torch.Tensor, centroids: torch.Tensor, column_bits: torch.Tensor,
                  outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> PackedCodebook:
    """Codes (N, K) indexing centroids (K, >= 2^max_bits) per column, widths (K,) -> the stored form.

    Column j uses centroids[j, :2**column_bits[j]]. Outliers (rows, cols, values) replace the weight at
    those positions; a position may appear once.
    """
    column_bits = column_bits.to(torch.int64).cpu()
    _check_codebook_parts(codes, centroids, column_bits)
    n, k = codes.shape
    device = codes.device
    perm = torch.argsort(column_bits, stable=True)
    widths, counts = torch.unique_consecutive(column_bits[perm], return_counts=True)
    layout = CodebookLayout(tuple((int(b), int(c)) for b, c in zip(widths, counts)))
    words, books = [], []
    perm_dev = perm.to(device)
    for (bits, cols), start in zip(layout.slabs, layout.col_starts):
        idx = perm_dev[start:start + cols]
        words.append(pack_codes(codes.index_select(1, idx).to(torch.uint8), bits))
        books.append(centroids.index_select(0, idx.to(centroids.device))[:, :1 << bits].reshape(-1))
    packed = PackedCodebook(layout, torch.cat(words, 1).contiguous(),
                            torch.cat(books).to(device=device, dtype=torch.float16).contiguous(),
                            perm.to(device=device, dtype=torch.int32))
    if outliers is not None:
        packed.outlier_rowptr, packed.outlier_cols, packed.outlier_vals = _pack_outliers(outliers, n, k, device)
    return packed


def _pack_outliers(outliers, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(outliers) != 3:
        raise ValueError("outliers must be a tuple (rows, cols, values)")
    rows, cols, vals = (t.reshape(-1) for t in outliers)
    if not (rows.numel() == cols.numel() == vals.numel()):
        raise ValueError(f"outlier rows, cols and values differ in length: {rows.numel()}, {cols.numel()}, "
                         f"{vals.numel()}")
    rows = rows.to(device=device, dtype=torch.int64)
    cols = cols.to(device=device, dtype=torch.int64)
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= n or int(cols.min()) < 0 or int(cols.max()) >= k:
            raise ValueError(f"outlier positions out of range for a ({n}, {k}) weight")
        if not torch.isfinite(vals).all():
            raise ValueError("outlier values must be finite")
    key = rows * k + cols
    order = torch.argsort(key)
    key = key[order]
    if key.numel() > 1 and bool((key[1:] == key[:-1]).any()):
        raise ValueError("outlier positions repeat: give each (row, col) once")
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    rowptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return (rowptr.to(torch.int32), cols[order].to(outlier_col_dtype(k)),
            vals.to(device)[order].to(torch.float16))


def _codebook_values(qweight: torch.Tensor, codebooks: torch.Tensor, layout: CodebookLayout) -> torch.Tensor:
    """(N, K) float32 codebook weights in stored column order (outliers not applied)."""
    parts = []
    for i, ((bits, cols), w0) in enumerate(zip(layout.slabs, layout.word_offsets)):
        codes = unpack_codes(qweight[:, w0:layout.word_offsets[i + 1]], bits, cols).to(torch.int64)
        book = codebooks[layout.codebook_offsets[i]:layout.codebook_offsets[i + 1]].view(cols, 1 << bits)
        col = torch.arange(cols, device=qweight.device)
        parts.append(book.to(torch.float32)[col.unsqueeze(0), codes])
    return torch.cat(parts, 1)


def outlier_rows(rowptr: torch.Tensor) -> torch.Tensor:
    """CSR row pointer -> the row index of every entry."""
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=rowptr.device), counts)


def codebook_outlier_deltas(qweight: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                            layout: CodebookLayout, rowptr: torch.Tensor, cols: torch.Tensor,
                            vals: torch.Tensor) -> torch.Tensor:
    """value - codebook value at every outlier position (float32): what the kernels add on top of the LUT."""
    if cols.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=qweight.device)
    rows = outlier_rows(rowptr)
    inv = torch.empty_like(perm, dtype=torch.int64)
    inv[perm.to(torch.int64)] = torch.arange(perm.numel(), device=perm.device)
    stored_col = inv[cols.to(torch.int64)]
    column_bits = layout.column_bits().to(qweight.device)
    starts = torch.tensor(layout.col_starts, device=qweight.device)
    slab = torch.bucketize(stored_col, starts, right=True) - 1
    local = stored_col - starts[slab]
    bits = column_bits[stored_col]
    word_off = torch.tensor(layout.word_offsets[:-1], device=qweight.device)[slab]
    bit = local * bits
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))
    w = word_off + bit // 32
    both = words[rows, w] | (words[rows, w + 1] << 32)
    code = (both >> (bit % 32)) & ((1 << bits) - 1)
    cb_off = torch.tensor(layout.codebook_offsets[:-1], device=qweight.device)[slab]
    current = codebooks[cb_off + (local << bits) + code].to(torch.float32)
    return vals.to(torch.float32) - current


def dequantize_codebook(packed: PackedCodebook, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (N, K) weights in the original column order, outliers applied."""
    stored = _codebook_values(packed.qweight, packed.codebooks, packed.layout)
    w = torch.empty_like(stored)
    w[:, packed.perm.to(torch.int64)] = stored
    if packed.outlier_rowptr is not None and packed.outlier_cols.numel():
        rows = outlier_rows(packed.outlier_rowptr)
        w[rows, packed.outlier_cols.to(torch.int64)] = packed.outlier_vals.to(torch.float32)
    return w.to(dtype)


def codebook_effective_bits(layout: CodebookLayout, out_features: int, outliers: int = 0,
                            has_outliers: bool = False) -> float:
    """Stored bits per weight: packed codes (padding included), float16 codebooks, the int32 permutation and,
    with outliers, the CSR row pointer plus a column index and a float16 value per outlier."""
    k = layout.in_features
    total = out_features * layout.total_words * 32 + 16 * layout.codebook_length + 32 * k
    if has_outliers:
        col_bits = torch.iinfo(outlier_col_dtype(k)).bits
        total += 32 * (out_features + 1) + outliers * (col_bits + 16)
    return total / (out_features * k)

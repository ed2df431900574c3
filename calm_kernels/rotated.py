"""Rotated weight-and-activation quantized matmul (W3A3, W4A4, W4A8): online orthogonal transform of the
activations fused with per-token quantization, then an int8 tensor-core GEMM against packed 2/3/4-bit weights.

    y = x W^T = (x R)(W R^-T)^T,   R = norm * (F_1 kron F_2)   (orthogonal for a Hadamard)

Contract
- Transform (`KroneckerTransform`): R acts on the activation row from the right, x' = x R; the weights are
  folded offline as W' = W R^-T (= W R when R is orthogonal). The factors are kept unnormalized (a Hadamard
  keeps its +-1 entries) and `norm` carries the scalar, so integer inputs transform exactly.
  - `hadamard_transform(n)`: a normalized Hadamard of order n as one factor or the Kronecker product of two,
    each of order <= 128 and constructible here: Sylvester 2^k, Paley I (q + 1, q a prime power = 3 mod 4),
    Paley II (2(q + 1), q a prime power = 1 mod 4) and doublings. Every matrix is checked H H^T = d I in
    integers. Reached: every multiple of 4 up to 128 except 92 and 116 (Williamson-type, not built), so for
    example 576 = 36 x 16, 896 = 28 x 32, 1536 = 24 x 64, 4096 = 64 x 64, 4864 = 76 x 64, 14336 = 112 x 128.
    Wider rows (padded past 16384, or a factor past 128) take QuaRot's decomposition n = m * 2^k, m the
    smallest constructible order <= 256 (Sylvester, Paley I/II up to 256): three factors H_m kron H_a kron H_b
    with a * b = 2^k (Sylvester, so exactly the fast Walsh-Hadamard transform of 2^k), e.g. 18944 (Qwen2-7B
    MLP) = 148 (Paley II over GF(73)) x 8 x 16, 28672 = 28 (Paley I over GF(27)) x 32 x 32, 32768 = 2 x 128
    x 128. Sizes the one/two-factor split reaches keep that matrix (saved models fold it into their weights).
    Sizes no Hadamard construction here reaches, e.g. 11008 = 43 * 2^8 of LLaMA-2-7B (QuaRot uses a
    Williamson-type Hadamard of order 172, which no Sylvester/Paley construction gives) or 368 = 23 * 16, take
    an orthogonal dense factor instead: Hartley_m kron H_(2^j) (`hartley_matrix`, m the odd part), so
    11008 = 86 x 128 with 86 = Hartley_43 kron H_2. Its entries reach sqrt(2 / n) where a Hadamard's are
    1 / sqrt(n); on heavy-tailed rows (Student-t, 8 channels x30, n = 1536) 4-bit per-token error after the
    rotation was 0.0128 against the Hadamard's 0.0122 (0.124 unrotated; `python bench/hartley_vs_hadamard.py`).
    Its factors are not integers, so fp16 operand rounding can move a code next to a rounding tie (the tests
    bound it as for learned factors).
    Refused (ValueError naming the reason; `supported_hadamard_size(n)` tells in advance): an odd part above
    256, or above 128 with fewer than 16 columns per chunk (e.g. 131, 262).
  - `kronecker_transform(p1[, p2])`: learned invertible factors (the FlatQuant-style affine path), each of
    order <= 128.
- Activation quantization, per token, symmetric, b in {3, 4, 8}:
  scale = clip_ratio * max|x'| / (2^(b-1) - 1), code = clamp(round_half_to_even(x' / scale), -2^(b-1),
  2^(b-1) - 1) in int8; an all-zero token gets scale 0 and codes 0. `fake_quantize_activations` is the public
  quantize-dequantize reference.
- Weights: per-output-channel symmetric RTN with the same code range (`quantize_weights_rtn`); codes q are
  stored offset-binary, q + 2^(b-1), in the project's bit stream (`calm_kernels.packing.pack_codes`) by
  `pack_weight_codes`; scales (N,) float32.
- GEMM: y[m, n] = a_scale[m] * w_scale[n] * sum_k a[m, k] q[n, k] (+ bias), int32 accumulation, output in
  fp16/bf16/fp32 (`rotated_matmul`); `int_matmul` returns the raw int32 sums.

Kernels (Triton, in `calm_kernels/_rotated_triton.py`, imported only when a launcher runs them)
- Transform + quantize, two factors: one program walks TOKENS_PER_PROG tokens; each token row is a (d1, d2)
  tile: one read of x, amax, an exact power-of-two normalization (keeps fp16 operands in range for any
  input magnitude), F1^T X then (.) F2 as two fp16 tensor-core dots with fp32 accumulation, amax,
  quantization, one write of int8 codes and a float32 scale. One factor or none: tokens as rows of a
  (BLOCK_T, K) tile, one dot. Rows are limited to 16384 padded elements (32768 without a transform).
- Chunked transform (three factors, rows too wide for registers): three launches over a float32 scratch
  row per token: (1) the row as an (m, 2^k) matrix, F1^T X on the tensor cores per column block (each column
  normalized by its own power of two), (2) each 2^k chunk as an (a, b) tile, F2^T C F3 in place plus the
  chunk's max, (3) the token's scale from the chunk maxima and the codes. Costs about 3 float32 row reads
  and writes beyond the one-pass kernel; unmeasured on a GPU.
- GEMM: int8 x int8 -> int32 `tl.dot`; the packed weight tile is sign-extended in registers (XOR with the
  fields' top bits turns offset-binary into two's complement, then shift left, arithmetic shift right; 3-bit
  codes straddle 32-bit words, so they are cut from 64-bit word pairs); scales and bias in the epilogue.
  K is a compile-time constant. Decode (M <= 16) configs may split K over 2 or 4 programs per column tile:
  int32 partials meet by integer atomics in a self-cleaning workspace (exact, so bit for bit the unsplit
  result; the tile's last program runs the epilogue), for widths whose column tiles alone leave SMs idle.
  Prefill configs go up to BLOCK_M = 256.
- Fused decode (`rotated_linear`, M <= 16 with a one/two-factor transform): one launch; every program
  transforms and quantizes all M tokens in its prologue (the same bytes into shared (M, K) codes and (M,)
  scales buffers), passes a CTA barrier, and runs the GEMM of its column tile reading them back through L2.
  The transform is recomputed by every program (M * (d1 + d2) * K tensor-core multiply-adds each), which the
  saved launch must outweigh: bench_rotated.py times it beside the two launches (`calm:two-launch`).
Numerics: the kernel rounds each dot's activation operand to fp16 (11-bit significand, relative to the
token's normalized max); the reference transforms in float32. Codes therefore agree exactly when the
transform is exact in both (integer inputs and factors, as the tests use) and otherwise differ by one only
next to a rounding tie (measured: within 0.06 of a tie at 8 bits, 0.002 at 4 bits; about 1% of codes at
8 bits). Division is IEEE (`div_rn`) and rounding is half-to-even on both sides; the fp32 magic-number
rounding in Triton matches `torch.round` exactly.

Tested: the references on the CPU; the Triton kernels under TRITON_INTERPRET=1 (exact codes, exact int32
GEMM, epilogue, module, chunked and fused paths); every autotune config compiles for sm90 without a GPU
(tests/kernels/test_rotated.py, shared memory within 227 KiB). Not yet run on a GPU: every performance
figure is unverified.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from calm_kernels._dispatch import use_triton
from calm_kernels.packing import pack_codes, packed_words, unpack_codes

ACTIVATION_BITS = (3, 4, 8)
WEIGHT_BITS = (2, 3, 4)
MAX_FACTOR_ORDER = 128  # a factor's padded (D, D) fp16 matrix must fit one tensor-core operand tile
MIN_PADDED_FACTOR = 16  # tl.dot needs every dimension >= 16
MAX_PADDED_ROW = 16384  # two factors of padded order <= 128; a whole padded token row lives in registers
MAX_PLAIN_ROW = 32768  # transform 'none': one padded row per program, no dot operands beside it
MAX_MIX_ORDER = 256  # a chunked transform's first factor: (256, BJ) fp32 accumulator tiles in the mixing kernel


# ----------------------------------------------------------------------------------------------------------
# Rounding and quantizer references (the oracles the kernels are tested against)
# ----------------------------------------------------------------------------------------------------------

def round_half_to_even(t: torch.Tensor) -> torch.Tensor:
    """The one rounding rule of this file: nearest integer, ties to even (IEEE), as `torch.round` does.

    The Triton kernels implement the same rule with the fp32 magic-number add (exact for |v| < 2^22; values
    are clamped to the code range first), so kernel codes and reference codes agree bit for bit."""
    return torch.round(t)


def code_range(bits: int) -> tuple[int, int]:
    """Signed symmetric code range [-2^(b-1), 2^(b-1) - 1]; the scale maps max|x| to 2^(b-1) - 1."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check_activation_bits(bits: int) -> None:
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"activation bits must be one of {ACTIVATION_BITS}, got {bits}")


def _check_weight_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits}")


def _check_clip(clip_ratio: float) -> None:
    if not (0.0 < clip_ratio <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")


def _scale_multiplier(bits: int, clip_ratio: float, device: torch.device | str | None = "cpu") -> torch.Tensor:
    # One float32 constant clip/qmax, rounded once, used identically by the reference and the kernel.
    return torch.tensor(clip_ratio / code_range(bits)[1], dtype=torch.float32, device=device)


def quantize_per_token_reference(x: torch.Tensor, bits: int, clip_ratio: float = 1.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of a float (T, K) tensor: (int8 codes (T, K), float32 scales (T,))."""
    _check_activation_bits(bits)
    _check_clip(clip_ratio)
    qmin, qmax = code_range(bits)
    z = x.to(torch.float32)
    scale = z.abs().amax(dim=-1) * _scale_multiplier(bits, clip_ratio, z.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = round_half_to_even(torch.clamp(z / safe.unsqueeze(-1), qmin, qmax)).to(torch.int8)
    return codes, scale


def fake_quantize_activations(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Per-token symmetric quantize-dequantize along the last dim (any leading dims); returns x's dtype.

    bits in {3, 4, 8}; clip_ratio in (0, 1] shrinks the per-token max before the scale is taken."""
    shape = x.shape
    codes, scale = quantize_per_token_reference(x.reshape(-1, shape[-1]), bits, clip_ratio)
    return (codes.to(torch.float32) * scale.unsqueeze(-1)).reshape(shape).to(x.dtype)


def quantize_weights_rtn(w: torch.Tensor, bits: int, clip_ratio: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric round-to-nearest of (N, K) weights: (int8 signed codes, float32 scales (N,))."""
    _check_weight_bits(bits)
    _check_clip(clip_ratio)
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D (out_features, in_features), got {tuple(w.shape)}")
    qmin, qmax = code_range(bits)
    z = w.to(torch.float32)
    scale = z.abs().amax(dim=1) * torch.tensor(clip_ratio / qmax, dtype=torch.float32, device=z.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = round_half_to_even(torch.clamp(z / safe.unsqueeze(1), qmin, qmax)).to(torch.int8)
    return codes, scale


def pack_weight_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed (N, K) weight codes in [-2^(b-1), 2^(b-1) - 1] -> packed int32 words, stored offset-binary."""
    _check_weight_bits(bits)
    qmin, qmax = code_range(bits)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < qmin or int(c.max()) > qmax):
        raise ValueError(f"signed {bits}-bit weight codes must lie in [{qmin}, {qmax}], "
                         f"got [{int(c.min())}, {int(c.max())}]")
    return pack_codes(c - qmin, bits)


def unpack_weight_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_weight_codes: (N, words) int32 -> signed int8 codes (N, k)."""
    _check_weight_bits(bits)
    return (unpack_codes(packed, bits, k).to(torch.int16) + code_range(bits)[0]).to(torch.int8)


# ----------------------------------------------------------------------------------------------------------
# Hadamard matrices of the small orders
# ----------------------------------------------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials are coefficient lists, lowest degree first; f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible_poly(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division, small p^k only)."""
    def monic(deg: int):
        for n in range(p ** deg):
            yield [(n // p ** i) % p for i in range(deg)] + [1]

    for f in monic(k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(e_i - e_j) over GF(q), chi the quadratic character; elements are base-p digit vectors
    (polynomials modulo a monic irreducible of degree k when q = p^k)."""
    p, k = _prime_power(q)
    digits = torch.tensor([[(n // p ** i) % p for i in range(k)] for n in range(q)], dtype=torch.int64)
    weights = torch.tensor([p ** i for i in range(k)], dtype=torch.int64)
    if k == 1:
        squares = {(n * n) % p for n in range(1, p)}
    else:
        f = _irreducible_poly(p, k)
        squares = set()
        for n in range(1, q):
            a = digits[n].tolist()
            prod = [0] * (2 * k - 1)
            for i, ai in enumerate(a):
                for j, aj in enumerate(a):
                    prod[i + j] += ai * aj
            rem = _poly_mod(prod, f, p)
            squares.add(sum(c * p ** i for i, c in enumerate(rem)))
    chi = torch.tensor([0] + [1 if n in squares else -1 for n in range(1, q)], dtype=torch.int64)
    difference = ((digits[:, None, :] - digits[None, :, :]) % p * weights).sum(-1)
    return chi[difference]


def _paley_core(q: int, skew: bool) -> torch.Tensor:
    """[[0, 1^T], [+-1, Q]]: the conference-type core of both Paley constructions."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1 if skew else 1
    s[1:, 1:] = _jacobsthal(q)
    return s


@functools.cache
def _hadamard_int(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n (int64, CPU), or None when none of our constructions reaches n."""
    with torch.device("cpu"):  # host-side construction, whatever default device the caller has set
        return _construct_hadamard(n)


def _construct_hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if n == 2:
        return torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    if n % 4:
        return None
    if n & (n - 1) == 0:  # Sylvester
        h = _hadamard_int(n // 2)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    pp = _prime_power(n - 1)
    if pp is not None and (n - 1) % 4 == 3:  # Paley I: H = I + S, S skew
        return torch.eye(n, dtype=torch.int64) + _paley_core(n - 1, skew=True)
    q = n // 2 - 1
    if _prime_power(q) is not None and q % 4 == 1:  # Paley II
        s = _paley_core(q, skew=False)
        a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
        b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
        return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)
    half = _hadamard_int(n // 2)
    if half is not None:
        return torch.kron(_hadamard_int(2), half)
    return None


@functools.cache
def _verified_hadamard(n: int) -> torch.Tensor:
    h = _hadamard_int(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here (Sylvester, Paley I/II and "
                         f"doublings reach every multiple of 4 up to 128 except 92 and 116)")
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64, device=h.device)):
        raise AssertionError(f"constructed Hadamard matrix of order {n} fails H H^T = n I")
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """Unnormalized +-1 Hadamard matrix of order n (int64), verified H H^T = n I; ValueError if not constructible."""
    return _verified_hadamard(n).clone()


@functools.cache
def hadamard_orders(limit: int = MAX_FACTOR_ORDER) -> tuple[int, ...]:
    """Orders <= limit for which hadamard_matrix succeeds."""
    return tuple(n for n in range(1, limit + 1) if _hadamard_int(n) is not None)


# ----------------------------------------------------------------------------------------------------------
# Kronecker transforms
# ----------------------------------------------------------------------------------------------------------

def padded_order(d: int) -> int:
    """Factor order as the kernel holds it: the next power of two, at least MIN_PADDED_FACTOR."""
    return max(MIN_PADDED_FACTOR, 1 << (d - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KroneckerTransform:
    """R = norm * kron(factors[0], factors[1], ...), applied as x' = x R; weights fold as W' = W R^-T.

    Args:
        factors: 1 or 2 square float32 matrices, each of order <= 128, or 3 with the first of order <= 256
            (a chunked transform: see `chunked`); their orders multiply to `size`.
        norm: scalar multiplier (1/sqrt(n) for a Hadamard; 1 for learned factors).
        orthogonal: True when R R^T = I (Hadamard); then R^-T = R and no inverse is computed.
    """
    factors: tuple[torch.Tensor, ...]
    norm: float
    orthogonal: bool

    def __post_init__(self):
        if not 1 <= len(self.factors) <= 3:
            raise ValueError(f"a Kronecker transform takes 1 to 3 factors, got {len(self.factors)}")
        for i, f in enumerate(self.factors):
            if f.dim() != 2 or f.shape[0] != f.shape[1]:
                raise ValueError(f"Kronecker factors must be square matrices, got shape {tuple(f.shape)}")
            limit = MAX_MIX_ORDER if (i == 0 and len(self.factors) == 3) else MAX_FACTOR_ORDER
            if f.shape[0] > limit:
                raise ValueError(f"a Kronecker factor of order {f.shape[0]} exceeds {limit}: split it into smaller "
                                 f"factors")
        if self.padded_size > MAX_PADDED_ROW:
            what = "chunk" if self.chunked else "row"
            raise ValueError(f"transform of size {self.size} pads to {self.padded_size} > {MAX_PADDED_ROW} "
                             f"elements per token {what}, more than the fused kernel holds in registers")

    @property
    def chunked(self) -> bool:
        """Three factors: the first mixes the token's contiguous chunks, the other two act inside each chunk
        (the kernel's multi-pass path for rows too wide for registers)."""
        return len(self.factors) == 3

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def size(self) -> int:
        return math.prod(self.orders)

    @property
    def padded_size(self) -> int:
        """Padded elements the kernel holds per token row, or per chunk for a chunked transform."""
        return math.prod(padded_order(d) for d in (self.orders[1:] if self.chunked else self.orders))

    def matrix(self) -> torch.Tensor:
        """Dense R (float64): for tests and small sizes only."""
        r = torch.ones(1, 1, dtype=torch.float64, device=self.factors[0].device)
        for f in self.factors:
            r = torch.kron(r, f.to(torch.float64))
        return r * self.norm

    def apply_unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """x kron(factors) along the last dim, float32 (no `norm`): the reference of the kernel's stages."""
        shape = x.shape
        z = x.to(torch.float32).reshape(-1, *self.orders)
        for axis, f in enumerate(self.factors, start=1):
            z = torch.movedim(torch.tensordot(z, f.to(torch.float32), dims=([axis], [0])), -1, axis)
        return z.reshape(shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R along the last dim (float32)."""
        return self.apply_unnormalized(x) * self.norm

    def fold_into_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W R^-T (float32), so that (x R) W'^T = x W^T."""
        if w.shape[-1] != self.size:
            raise ValueError(f"weight has {w.shape[-1]} input features, the transform has size {self.size}")
        w32 = w.to(torch.float32)
        if self.orthogonal:
            return self.apply(w32)
        inv_t = KroneckerTransform(tuple(torch.linalg.inv(f.to(torch.float64)).T.to(torch.float32)
                                         for f in self.factors), 1.0 / self.norm, False)
        return inv_t.apply(w32)


def _hadamard_split(n: int, max_order: int) -> tuple[int, ...] | None:
    """One or two constructible Hadamard orders <= max_order multiplying to n, chosen by smallest padded
    row, then one factor over two, then a power-of-two second factor (its rows are the contiguous, aligned
    loads), then fewest padded dot columns."""
    orders = [d for d in hadamard_orders(max_order) if d > 1]
    best, best_key = None, None
    for split in [(n,)] + [(a, n // a) for a in orders if n % a == 0]:
        if not all(d in orders for d in split):
            continue
        padded = [padded_order(d) for d in split]
        key = (math.prod(padded), len(split), split[-1] & (split[-1] - 1) != 0, sum(padded))
        if best_key is None or key < best_key:
            best, best_key = split, key
    if best is None or best_key[0] > MAX_PADDED_ROW:
        return None
    return best


def _hadamard_chunked_split(n: int) -> tuple[int, int, int] | None:
    """QuaRot's decomposition for rows too wide for `_hadamard_split`: n = m * 2^k with m the smallest
    constructible Hadamard order (<= MAX_MIX_ORDER) that leaves a power of two 2^k = a * b (Sylvester, so
    exactly H_a kron H_b) with a <= b <= MAX_FACTOR_ORDER as square as possible. None when no m fits (e.g.
    11008 = 2^8 * 43 needs order 172, a Williamson-type matrix not built here)."""
    for m in hadamard_orders(MAX_MIX_ORDER):
        p = n // m
        if n % m or p & (p - 1) or p > MAX_FACTOR_ORDER ** 2:
            continue
        b = min(MAX_FACTOR_ORDER, 1 << ((p.bit_length() - 1 + 1) // 2))
        return m, p // b, b
    return None


def hartley_matrix(n: int) -> torch.Tensor:
    """The discrete Hartley transform's kernel H[i, j] = cas(2 pi i j / n) = cos + sin (float64): symmetric with
    H H = n I, so H / sqrt(n) is orthogonal at every order, odd ones included. Its entries reach sqrt(2) where a
    Hadamard's are all 1: it spreads an outlier channel almost as evenly (no entry above sqrt(2 / n) after
    normalization), without the +-1 entries that make a Hadamard exact in fp16."""
    k = torch.arange(n, dtype=torch.int64)
    angle = (2 * math.pi / n) * torch.remainder(torch.outer(k, k), n).to(torch.float64)
    return torch.cos(angle) + torch.sin(angle)


def _odd_part(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k and m odd."""
    p = n & -n
    return n // p, p


def _hartley_split(n: int) -> tuple[int, ...] | None:
    """Orders for a size no Hadamard construction here reaches (11008 = 43 * 2^8 of LLaMA-2-7B, 368 = 23 * 16):
    n = m * 2^k, m odd, with the dense factor Hartley_m kron H_(2^j) of order m * 2^j and Sylvester factors for
    the rest, as one or two factors (same preferences as `_hadamard_split`) or, for wider rows, three with the
    dense factor first (<= MAX_MIX_ORDER), as `_hadamard_chunked_split` does."""
    m, p = _odd_part(n)
    if m == 1 or m > MAX_MIX_ORDER:
        return None
    best, best_key = None, None
    for j in range(p.bit_length()):
        dense, rest = m << j, p >> j
        split = (dense,) if rest == 1 else (dense, rest)
        if max(split) > MAX_FACTOR_ORDER:
            continue
        padded = [padded_order(d) for d in split]
        key = (math.prod(padded), len(split), sum(padded))
        if math.prod(padded) <= MAX_PADDED_ROW and (best_key is None or key < best_key):
            best, best_key = split, key
    if best is not None:
        return best
    if p < MIN_PADDED_FACTOR or p > MAX_FACTOR_ORDER ** 2:  # chunks narrower than one dot tile: not worth it
        return None
    b = min(MAX_FACTOR_ORDER, 1 << ((p.bit_length() - 1 + 1) // 2))
    return (m, p // b, b) if p // b <= MAX_FACTOR_ORDER else None


def _orthogonal_factor(d: int) -> torch.Tensor:
    """The unnormalized factor of order d: a Hadamard matrix when one is built here, else Hartley_m kron
    H_(2^j) (d = m * 2^j, m odd): both square to d I."""
    if _hadamard_int(d) is not None:
        return hadamard_matrix(d).to(torch.float32)
    m, p = _odd_part(d)
    return torch.kron(hartley_matrix(m), hadamard_matrix(p).to(torch.float64)).to(torch.float32)


def _hadamard_orders_for(n: int, max_order: int) -> tuple[int, ...] | None:
    # Sizes the one/two-factor split reaches keep it (a saved model's folded weights depend on the exact
    # matrix); the chunked split, then the Hartley split, only add sizes that were refused before.
    if max_order != MAX_FACTOR_ORDER:
        return _hadamard_split(n, max_order)
    return _hadamard_split(n, max_order) or _hadamard_chunked_split(n) or _hartley_split(n)


def supported_hadamard_size(n: int, max_order: int = MAX_FACTOR_ORDER) -> bool:
    """True when hadamard_transform(n) exists."""
    return n >= 1 and _hadamard_orders_for(n, max_order) is not None


def hadamard_transform(n: int, max_order: int = MAX_FACTOR_ORDER) -> KroneckerTransform:
    """Normalized Hadamard of order n as one or two Kronecker factors of order <= max_order, or (wider rows)
    three: H_m kron H_a kron H_b with m <= 256 and a, b powers of two (`_hadamard_chunked_split`)."""
    split = _hadamard_orders_for(n, max_order) if n >= 1 else None
    if split is None:
        raise ValueError(
            f"no online Hadamard of size {n}: it must be one Hadamard order or a product of two, each <= {max_order} "
            f"(constructible: {', '.join(map(str, hadamard_orders(max_order)))}) with a padded row <= "
            f"{MAX_PADDED_ROW}, or m * 2^k with m a constructible order <= {MAX_MIX_ORDER}; use transform='none' "
            f"or Kronecker factors for this layer")
    factors = tuple(_orthogonal_factor(d) for d in split)
    return KroneckerTransform(factors, 1.0 / math.sqrt(n), orthogonal=True)


def kronecker_transform(*factors: torch.Tensor, orthogonal: bool = False) -> KroneckerTransform:
    """Learned (invertible) Kronecker factors P1[, P2]: x' = x (P1 kron P2), W' = W (P1 kron P2)^-T."""
    return KroneckerTransform(tuple(f.detach().to(torch.float32).contiguous() for f in factors), 1.0, orthogonal)


def kernel_factors(transform: KroneckerTransform, device: torch.device | str | None = None
                   ) -> tuple[tuple[torch.Tensor, ...], float]:
    """The operands the fused kernel reads: each factor zero-padded to (D, D) fp16 and scaled by a power
    of two so its max |entry| lies in [0.5, 1) (keeps fp16 in range; exact), and the norm absorbing those
    powers. Build once per layer (calm.nn caches it)."""
    padded, norm = [], transform.norm
    for f in transform.factors:
        d, big = f.shape[0], padded_order(f.shape[0])
        amax = float(f.abs().max())
        exp = math.frexp(amax)[1] if amax > 0 else 0
        g = torch.zeros(big, big, dtype=torch.float32, device=f.device)
        g[:d, :d] = f.to(torch.float32) * 2.0 ** (-exp)
        norm *= 2.0 ** exp
        padded.append(g.to(torch.float16).to(device).contiguous())
    return tuple(padded), norm


# ----------------------------------------------------------------------------------------------------------
# Fused transform + per-token quantization
# ----------------------------------------------------------------------------------------------------------

def _check_activations(x: torch.Tensor, transform: KroneckerTransform | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D (tokens, features); reshape leading dims first, got "
                         f"{tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if transform is not None and x.shape[1] != transform.size:
        raise ValueError(f"activations have {x.shape[1]} features, the transform has size {transform.size}")


def transform_quantize_reference(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                                 transform: KroneckerTransform | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of x R, computed as the kernel orders it: transform with the unnormalized factors,
    quantize, then multiply the scale by `norm` (codes do not depend on a positive scalar)."""
    _check_activations(x, transform)
    if transform is None:
        return quantize_per_token_reference(x, bits, clip_ratio)
    codes, scale = quantize_per_token_reference(transform.apply_unnormalized(x), bits, clip_ratio)
    return codes, scale * torch.tensor(transform.norm, dtype=torch.float32, device=scale.device)


def transform_quantize(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                       transform: KroneckerTransform | None = None,
                       factors: tuple[tuple[torch.Tensor, ...], float] | None = None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) float -> (codes int8 (T, K), scales float32 (T,)) of x R quantized per token.

    `factors`: kernel_factors(transform) prepared in advance (optional; built here otherwise).
    `out`: preallocated (codes, scales) to write into (optional)."""
    _check_activations(x, transform)
    _check_activation_bits(bits)
    _check_clip(clip_ratio)
    t, k = x.shape
    if out is not None:
        codes, scales = out
        if codes.shape != (t, k) or codes.dtype != torch.int8 or not codes.is_contiguous():
            raise ValueError(f"out codes must be a contiguous int8 ({t}, {k}) tensor")
        if scales.shape != (t,) or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError(f"out scales must be a contiguous float32 ({t},) tensor")
    if not use_triton(x):
        result = transform_quantize_reference(x, bits, clip_ratio, transform)
        if out is None:
            return result
        out[0].copy_(result[0])
        out[1].copy_(result[1])
        return out
    if x.stride(1) != 1:
        raise ValueError("activations must be contiguous along features (call .contiguous())")
    if transform is None and max(16, 1 << (k - 1).bit_length()) > MAX_PLAIN_ROW:
        raise ValueError(f"transform='none' holds a whole row per program: {k} features pad past {MAX_PLAIN_ROW}")
    from calm_kernels import _rotated_triton

    if transform is not None and factors is None:
        factors = kernel_factors(transform, x.device)
    if out is None:
        out = (torch.empty((t, k), dtype=torch.int8, device=x.device),
               torch.empty((t,), dtype=torch.float32, device=x.device))
    return _rotated_triton.transform_quantize(x, bits, float(_scale_multiplier(bits, clip_ratio)),
                                              transform.orders if transform is not None else (),
                                              factors, not (transform is None or transform.orthogonal), *out)


# ----------------------------------------------------------------------------------------------------------
# Integer GEMM against packed weights
# ----------------------------------------------------------------------------------------------------------

def _check_gemm(a_codes: torch.Tensor, w_packed: torch.Tensor, w_bits: int) -> None:
    _check_weight_bits(w_bits)
    if a_codes.dim() != 2 or a_codes.dtype != torch.int8:
        raise TypeError(f"activation codes must be a 2-D int8 tensor, got {a_codes.dtype} {tuple(a_codes.shape)}")
    if w_packed.dim() != 2 or w_packed.dtype != torch.int32:
        raise TypeError(f"packed weights must be a 2-D int32 tensor, got {w_packed.dtype} {tuple(w_packed.shape)}")
    k = a_codes.shape[1]
    if w_packed.shape[1] != packed_words(k, w_bits):
        raise ValueError(f"packed weights have {w_packed.shape[1]} words per row; {k} input features at "
                         f"{w_bits} bits need {packed_words(k, w_bits)}")
    if a_codes.device != w_packed.device:
        raise ValueError(f"activation codes on {a_codes.device}, weights on {w_packed.device}")


def int_matmul_reference(a_codes: torch.Tensor, w_packed: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Exact int32 sums_k a[m, k] q[n, k] (int64 matmul on the CPU)."""
    _check_gemm(a_codes, w_packed, w_bits)
    q = unpack_weight_codes(w_packed, w_bits, a_codes.shape[1])
    return (a_codes.cpu().to(torch.int64) @ q.cpu().to(torch.int64).T).to(torch.int32).to(a_codes.device)


def int_matmul(a_codes: torch.Tensor, w_packed: torch.Tensor, w_bits: int) -> torch.Tensor:
    """int8 (M, K) codes x packed signed weights (N, words) -> int32 (M, N), exact."""
    _check_gemm(a_codes, w_packed, w_bits)
    if not use_triton(a_codes, w_packed):
        return int_matmul_reference(a_codes, w_packed, w_bits)
    from calm_kernels import _rotated_triton

    out = torch.empty((a_codes.shape[0], w_packed.shape[0]), dtype=torch.int32, device=a_codes.device)
    return _rotated_triton.rotated_matmul(a_codes.contiguous(), None, w_packed.contiguous(), None, w_bits,
                                          None, out)


def rotated_matmul_reference(a_codes: torch.Tensor, a_scales: torch.Tensor, w_packed: torch.Tensor,
                             w_scales: torch.Tensor, w_bits: int, bias: torch.Tensor | None = None,
                             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float32 reference: (a * a_scale) (q * w_scale)^T + bias, cast to out_dtype. Integer sums stay exact
    in float32 while K * 128 * 2^(w_bits-1) < 2^24."""
    _check_gemm(a_codes, w_packed, w_bits)
    q = unpack_weight_codes(w_packed, w_bits, a_codes.shape[1]).to(torch.float32)
    acc = a_codes.to(torch.float32) @ q.T
    y = acc * a_scales.to(torch.float32).unsqueeze(1) * w_scales.to(torch.float32).unsqueeze(0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def rotated_matmul(a_codes: torch.Tensor, a_scales: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
                   w_bits: int, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = a_scale[m] w_scale[n] sum_k a[m, k] q[n, k] (+ bias) in out_dtype (fp16/bf16/fp32).

    `out`: a preallocated contiguous (M, N) tensor of out_dtype to write into (optional)."""
    _check_gemm(a_codes, w_packed, w_bits)
    m, n = a_codes.shape[0], w_packed.shape[0]
    if a_scales.shape != (m,) or w_scales.shape != (n,):
        raise ValueError(f"scales must be (M,) = ({m},) and (N,) = ({n},), got {tuple(a_scales.shape)} and "
                         f"{tuple(w_scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, t in (("a_scales", a_scales), ("w_scales", w_scales), ("bias", bias)):
        if t is not None and t.device != a_codes.device:
            raise ValueError(f"{name} is on {t.device}, the codes on {a_codes.device}: move it with .to()")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"output dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {out_dtype} ({m}, {n}) tensor")
    if not use_triton(a_codes, w_packed):
        y = rotated_matmul_reference(a_codes, a_scales, w_packed, w_scales, w_bits, bias, out_dtype)
        return y if out is None else out.copy_(y)
    from calm_kernels import _rotated_triton

    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a_codes.device)
    return _rotated_triton.rotated_matmul(a_codes.contiguous(), a_scales.to(torch.float32).contiguous(),
                                          w_packed.contiguous(), w_scales.to(torch.float32).contiguous(), w_bits,
                                          None if bias is None else bias.contiguous(), out)


# ----------------------------------------------------------------------------------------------------------
# The whole rotated linear: transform + quantize + GEMM
# ----------------------------------------------------------------------------------------------------------

def rotated_linear(x: torch.Tensor, a_bits: int, clip_ratio: float, transform: KroneckerTransform | None,
                   w_packed: torch.Tensor, w_scales: torch.Tensor, w_bits: int, bias: torch.Tensor | None = None,
                   factors: tuple[tuple[torch.Tensor, ...], float] | None = None) -> torch.Tensor:
    """y = quantize(x R) (W R^-T)^T + bias for x (M, K), in x's dtype: what RotatedQuantLinear computes.

    On the Triton path, M <= 16 tokens with a one- or two-factor transform take one fused launch (the
    transform and quantization in every program's prologue, `_rotated_triton.fused_decode`); otherwise
    `transform_quantize` then `rotated_matmul`. `factors`: kernel_factors(transform) built in advance."""
    _check_activations(x, transform)
    _check_activation_bits(a_bits)
    _check_clip(clip_ratio)
    m, k = x.shape
    fused = (transform is not None and not transform.chunked and 0 < m and use_triton(x, w_packed)
             and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if fused:
        from calm_kernels import _rotated_triton

        fused = m <= _rotated_triton.FUSED_MAX_M
    if not fused:
        codes, scales = transform_quantize(x, a_bits, clip_ratio, transform, factors)
        return rotated_matmul(codes, scales, w_packed, w_scales, w_bits, bias, x.dtype)
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    _check_gemm(codes, w_packed, w_bits)
    n = w_packed.shape[0]
    if w_scales.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"w_scales and bias must have shape ({n},)")
    if factors is None:
        factors = kernel_factors(transform, x.device)
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    return _rotated_triton.fused_decode(
        x, a_bits, float(_scale_multiplier(a_bits, clip_ratio)), transform.orders, factors,
        not transform.orthogonal, w_packed.contiguous(), w_scales.to(torch.float32).contiguous(), w_bits,
        None if bias is None else bias.contiguous(), out, codes, torch.empty((m,), dtype=torch.float32,
                                                                              device=x.device))

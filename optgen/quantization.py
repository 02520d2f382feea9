r"""Blockwise 8-bit optimizer state: the maps, the block geometry and the reference quantizer.

A state in 8 bits (``state_format="8bit"``) is stored as ``uint8`` codes of the parameter's shape and one fp32
scale per block of ``BLOCK`` consecutive elements (the block's largest magnitude, at least ``MIN_SCALE``; the
last block of a tensor may be shorter). A code indexes a sorted map of 256 fp32 values in [-1, 1] (``MAPS``):

.. math::
   x \approx \mathrm{map}[c_i] \cdot s_{\lfloor i / B \rfloor}, \qquad
   s_b = \max(\max_{i \in b} |x_i|, 10^{-12}), \qquad
   c_i = \operatorname*{arg\,min}_c |\mathrm{map}[c] - x_i / s_b|

The code is found by a branchless binary search over the map, then rounded to the nearer neighbour (ties up),
as torchao's ``quantize_8bit_with_qmap``: the kernels (C, Triton) and the eager oracle run the same steps in fp32,
so their codes equal torchao's on the same inputs. Signed states use the signed dynamic map of bitsandbytes and
torchao (Dettmers et al., 2022: an exponent of 0..-6 decades and a shrinking linear fraction), non-negative states
the unsigned one, means of squares that need it the unsigned one squared (``"square"``, below); the maps are data
(``MAPS``): a linear map is ``tuple(torch.linspace(-1, 1, 256).tolist())``.

The variants of a spec that reduce over rows or columns (factored: Adafactor, CAME) walk parameters row by row,
so there a block lies within a row of the last dimension (``row``: its length): blocks of 256 from each row's
first element, the last of a row shorter, ``rows * ceil(row / 256)`` scales; a 1-D tensor, one row, has the
flat blocks. (Under FSDP2 no block straddles a shard boundary either: see ``runtime.distributed``.)

Tensors of fewer than ``MIN_NUMEL`` elements keep full-precision state (as bitsandbytes and torchao): their
scales would cost more than the codes save. A NaN or infinity in a block makes that block's scale NaN (or
infinite), so the block's values all read NaN afterwards, as fp32 state would spread it through the update; no
other block is touched.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 256  # elements per scale
MIN_NUMEL = 4096  # smaller tensors keep full-precision state
MIN_ROW = 16  # and so do states whose blocks lie within shorter rows (factored variants)
MIN_SCALE = 1e-12  # a block of zeros keeps a finite scale (no 0/0 when quantizing)
KINDS = ("signed", "unsigned", "square")  # the map rows of the kernels' [3, 256] map table, in this order
STATE_BYTES = 1 + 4 / BLOCK  # bytes per element of an 8-bit state: the code and its share of the scale


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> tuple[float, ...]:
    """The dynamic quantization map of bitsandbytes' ``create_dynamic_map`` (without its zero padding, as torchao
    keeps it): per decade ``10**(i - 6)``, ``i < 7``, the midpoints of a linear split of [0.1, 1] into
    ``2**(i + 1)`` (signed, both signs) or ``2**(i + 2)`` (unsigned) parts, then 0 and 1. Computed with the same
    fp32 operations, so the values are the same floats."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        parts = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, int(parts))
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # (none for 8 bits with 7 exponent bits)
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"a dynamic map of {total_bits} bits has {2**total_bits} values, made {len(data)}")
    return tuple(sorted(data))


MAPS: dict[str, tuple[float, ...]] = {"signed": dynamic_map(True), "unsigned": dynamic_map(False)}
# A mean of squares (a second moment) spans twice the decades of its square root: in a block whose largest value
# is 1, torchao's unsigned map rounds every value below ~1e-7 to 0, where the first moment beside it is still
# kept, and m / (sqrt(v) + eps) jumps. Squared, the map keeps such a state with the precision the unsigned map
# gives its square root (values down to ~1e-14). LAMB needs it: its trust ratio hands the whole layer's step to
# such elements (optgen demo, LAMB with 8-bit states: 85.8% test accuracy with the unsigned map, 98.6% squared;
# fp32 state 97.5%).
MAPS["square"] = tuple(x * x for x in MAPS["unsigned"])


# The C kernels' quantizer reads tables made from the search below instead of searching: codes are monotone in x,
# so a code is the number of thresholds T[1..255] at or below x (T[c]: the smallest float whose code is at least
# c; T[0] = -inf, T[256] = NaN, never reached). A bucket of x -- its sign, binade (SEARCH_E0..127 of the exponent
# field; below them one bucket, above them, infinities and NaN another) and the top 7 bits of its mantissa -- holds
# at most one threshold (checked as the tables are made), and its entry counts the thresholds below it: a code is
# one bucket read and one threshold compare (three times faster than the search's ten dependent reads, measured
# on AVX-512), the same code for every float, NaN (code 0) included (tested).
SEARCH_E0 = 79  # 2**-48: below every map's smallest nonzero magnitude (the squared map's: 1.06e-13 = 2**-43.1)
SEARCH_BINADES = 130 - SEARCH_E0  # the tiny bucket, the binades SEARCH_E0..127, the huge one
SEARCH_BUCKETS = 2 * SEARCH_BINADES * 128
SEARCH_STRIDE = 257 + SEARCH_BUCKETS  # a map's thresholds, then its buckets' counts (int32)
SEARCH_OFFSET = len(KINDS) * 256  # where they start in map_table, after the maps


def map_table(device=None) -> torch.Tensor:
    """The maps as the kernels read them, fp32: ``[len(KINDS) * 256]`` values, a map of 256 per ``KINDS`` entry
    in order, then each map's search tables (``search_tables``; C's quantizer reads them, Triton's searches)."""
    return _map_table().to(device)


@functools.cache
def _map_table() -> torch.Tensor:
    maps = torch.tensor([MAPS[kind] for kind in KINDS], dtype=torch.float32).reshape(-1)
    tables = [torch.cat([t, buckets.view(torch.float32)]) for t, buckets in map(search_tables, KINDS)]
    return torch.cat([maps, *tables])


def _codes(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The code of each fp32 value of ``x`` (already divided by its scale): torchao's branchless search and
    rounding to the nearer neighbour (ties up)."""
    codes = torch.where(x >= table[128], 128, 0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        codes = codes + torch.where(x >= table[codes + step], step, 0)
    up = (codes + 1).clamp(max=255)
    down_value = table[codes]
    return torch.where(x - down_value >= (table[up] - down_value) * 0.5, up, codes)


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as int64 keys in the floats' order (-inf first)."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(u >= 2**31, 0xFFFFFFFF - u, u + 2**31)


def _unordered(keys: torch.Tensor) -> torch.Tensor:
    u = torch.where(keys >= 2**31, keys - 2**31, 0xFFFFFFFF - keys)
    return (u - (u >= 2**31).to(torch.int64) * 2**32).to(torch.int32).view(torch.float32)


def search_index(x: torch.Tensor) -> torch.Tensor:
    """The bucket of each fp32 value of ``x`` (see SEARCH_E0; the C kernels compute the same)."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    exponent = (u >> 23) & 0xFF
    negative = (u >> 31) | torch.isnan(x).to(torch.int64)  # NaN: the bucket of -inf (code 0, as the search)
    binade = torch.where(exponent < SEARCH_E0, 0, torch.where(exponent > 127, SEARCH_BINADES - 1, exponent - SEARCH_E0 + 1))
    mantissa = torch.where((exponent < SEARCH_E0) | (exponent > 127), 0, (u >> 16) & 127)
    return ((negative * SEARCH_BINADES + binade) << 7) | mantissa


@functools.cache
def search_tables(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Map ``kind``'s thresholds (fp32 [257]) and its buckets' counts of thresholds below them (int32
    [SEARCH_BUCKETS]): ``code(x) = n + (x >= T[n + 1])``, ``n = counts[search_index(x)]``."""
    table = map_of(kind)
    want = torch.arange(1, 256)
    f32 = dict(dtype=torch.float32)  # (whatever the default dtype)
    low, high = _ordered(torch.full((255,), -math.inf, **f32)), _ordered(torch.full((255,), math.inf, **f32))
    while bool((high - low > 1).any()):  # bisection over the floats in order: the smallest x of code >= c
        mid = low + (high - low) // 2
        above = _codes(_unordered(mid), table) >= want
        high, low = torch.where(above, mid, high), torch.where(above, low, mid)
    thresholds = torch.cat([torch.tensor([-math.inf], **f32), _unordered(high), torch.tensor([math.nan], **f32)])
    # each bucket's smallest and largest float
    negative, binade, mantissa = (torch.arange(n).view(shape) for n, shape in ((2, (2, 1, 1)), (SEARCH_BINADES, (1, -1, 1)), (128, (1, 1, -1))))
    bits = ((binade - 1 + SEARCH_E0) << 23) | (mantissa << 16)
    as_float = lambda b: b.to(torch.int32).view(torch.float32)  # noqa: E731
    small = as_float(torch.where(binade == 0, 0, bits))  # the bucket's magnitudes [small, large)
    large = as_float(torch.where(binade == 0, SEARCH_E0 << 23, bits + (1 << 16)))
    huge = binade == SEARCH_BINADES - 1
    first = torch.where(negative == 0, torch.where(huge, torch.tensor(2.0, **f32), small), torch.where(huge, torch.tensor(-math.inf, **f32), torch.nextafter(-large, torch.tensor(0.0, **f32))))
    last = torch.where(negative == 0, torch.where(huge, torch.tensor(math.inf, **f32), torch.nextafter(large, torch.tensor(0.0, **f32))), torch.where(huge, torch.tensor(-2.0, **f32), -small))
    inner = thresholds[1:256]
    below = torch.searchsorted(inner, first.expand(2, SEARCH_BINADES, 128).reshape(-1), right=True)
    inside = torch.searchsorted(inner, last.expand(2, SEARCH_BINADES, 128).reshape(-1), right=True) - below
    if int(inside.max()) > 1:  # a map denser than 128 values a binade: the tables would not find its codes
        raise ValueError(f"8-bit map {kind!r} has two thresholds within one bucket: too dense for the C quantizer's tables")
    return thresholds, below.to(torch.int32)


def map_of(kind: str, device=None) -> torch.Tensor:
    """Map ``kind`` as an fp32 tensor of 256 values."""
    return torch.tensor(MAPS[kind], dtype=torch.float32, device=device)


def quantized(numel: int, row: int | None = None) -> bool:
    """Whether a state of a tensor of ``numel`` elements (blocks within rows of ``row``, when given) is kept in 8
    bits, else in full precision: small tensors, and rows shorter than ``MIN_ROW`` (a 3x3 convolution's), whose
    scales would cost more than a quarter of the codes."""
    return numel >= MIN_NUMEL and (row is None or row >= MIN_ROW)


def n_blocks(numel: int, row: int | None = None) -> int:
    """Scales of an 8-bit state of ``numel`` elements: blocks of the flat tensor, or within rows of ``row``."""
    if row is None or row == 0:
        return math.ceil(numel / BLOCK)
    return numel // row * math.ceil(row / BLOCK)


def _blocks_view(flat: torch.Tensor, row: int | None) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks (of each row, with ``row``), as ``[blocks, BLOCK]``."""
    if row is None or row == 0:
        return torch.nn.functional.pad(flat, (0, n_blocks(flat.numel()) * BLOCK - flat.numel())).view(-1, BLOCK)
    rows = flat.view(-1, row)
    return torch.nn.functional.pad(rows, (0, math.ceil(row / BLOCK) * BLOCK - row)).reshape(-1, BLOCK)


def _unpad(blocks: torch.Tensor, numel: int, row: int | None) -> torch.Tensor:
    if row is None or row == 0:
        return blocks.reshape(-1)[:numel]
    return blocks.reshape(numel // row, math.ceil(row / BLOCK) * BLOCK)[:, :row].reshape(-1)


def quantize(values: torch.Tensor, kind: str, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference quantizer (the eager oracle's, and checkpoints' fp32 -> 8-bit): ``values`` (any float
    dtype, any shape) as fp32 ``(codes of its shape, scales [blocks])``; blocks within rows of ``row``
    elements when given; see the module docstring."""
    table = map_of(kind, values.device)
    flat = values.detach().reshape(-1).to(torch.float32)
    numel = flat.numel()
    padded = _blocks_view(flat, row)
    scale = padded.abs().amax(dim=1).clamp(min=MIN_SCALE)  # NaN stays NaN (amax and clamp propagate it)
    x = _unpad(padded / scale[:, None], numel, row)
    return _codes(x, table).to(torch.uint8).view(values.shape), scale


def block_row(shape, factored: bool) -> int | None:
    """The row length an 8-bit state's blocks lie within: the last dimension's in a factored variant of 2+
    dimensions (its kernels walk rows), else None: blocks of the flat tensor, which rows of a multiple of 256
    elements have too (one layout, one name)."""
    return int(shape[-1]) if factored and len(shape) >= 2 and shape[-1] % BLOCK else None


def block_index(numel: int, row: int | None = None, device=None) -> torch.Tensor:
    """The scale of each element of a tensor of ``numel`` elements (blocks within rows of ``row`` when given)."""
    index = torch.arange(numel, device=device)
    if row is None or row == 0:
        return index // BLOCK
    return index // row * math.ceil(row / BLOCK) + index % row // BLOCK


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind, row: int | None = None) -> torch.Tensor:
    """fp32 values of codes and scales (``map[code] * scale``, in fp32); ``kind``: a map's name, or its values;
    blocks within rows of ``row`` elements when given."""
    table = kind.to(codes.device, torch.float32) if isinstance(kind, torch.Tensor) else map_of(kind, codes.device)
    flat = table[codes.reshape(-1).long()]
    return (flat * scale[block_index(flat.numel(), row, codes.device)]).view(codes.shape)

"""Bit packing of unsigned integer codes into a byte stream.

Layout (little-endian bit order): element ``i`` occupies stream bits ``[i*b, (i+1)*b)``, its least
significant bit first, and stream bit ``k`` is bit ``k % 8`` (LSB = 0) of byte ``k // 8``. The last
byte is zero-padded. ``n`` codes of ``b`` bits take exactly ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np
import torch

MIN_BITS, MAX_BITS = 2, 8
# Elements per chunk: a multiple of 8, so every chunk starts on a byte boundary whatever the width;
# chunking bounds the (chunk x bits) temporary of bit planes on large models.
_CHUNK = 8 * 131072


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count * bits / 8)``."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values in ``[0, 2^bits)``) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.detach().reshape(-1).cpu().to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits, "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    out = np.empty(packed_nbytes(flat.size, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK].astype(np.uint8)
        planes = (part[:, None] >> shifts) & 1  # (m, bits), LSB first
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes (int32, flat) that :func:`pack_codes` packed into ``stream``."""
    _check_bits(bits)
    data = stream.detach().reshape(-1).cpu().numpy()
    if data.dtype != np.uint8 or data.size != packed_nbytes(count, bits):
        raise ValueError(f"a stream of {count} codes at {bits} bits is {packed_nbytes(count, bits)} uint8 bytes, "
                         f"got {data.size} of {data.dtype}")
    out = np.empty(count, dtype=np.int32)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        first = start * bits // 8
        planes = np.unpackbits(data[first:first + packed_nbytes(m, bits)], count=m * bits, bitorder="little")
        planes = planes.reshape(m, bits).astype(np.int32)
        value = np.zeros(m, dtype=np.int32)
        for k in range(bits):
            value |= planes[:, k] << k
        out[start:start + m] = value
    return torch.from_numpy(out)

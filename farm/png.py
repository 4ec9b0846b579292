"""The PNG file, compressed in bands on every core: at 8K, Pillow's single-threaded encoder (adaptive row
filters, then one zlib stream) took 10.6 s on a 2-core VM, 3.0 s this way (bench/png_write.py).

The format is the PNG specification's (W3C, 2003): the signature, IHDR, the text chunks, IDAT, IEND, each
chunk length + type + data + CRC-32 of type and data. Every row is filtered with the "Up" filter (type 2:
the byte minus the byte above it, modulo 256; the first row has none above, so it is stored as it is), a
single vectorised subtraction. The filtered rows go into one zlib stream (RFC 1950) whose deflate data (RFC
1951) is compressed band by band on a thread pool, as pigz does: each band's compressor ends on a byte
boundary with a sync flush, the last band with the final block, so the bands join into one valid stream
(a band never refers back into the band before it); the stream's Adler-32 runs over the bands in order.
The bytes depend on the image, the band height and the zlib level, never on how many threads ran.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
UP = 2  # the filter type byte of a row filtered with Up
BAND_ROWS = 256  # rows compressed as one band (at 8K: 6 MB of filtered rows)
LEVEL = 6  # zlib's default, as Pillow's
ZLIB_HEADER = b"\x78\x9c"  # deflate, 32 KiB window, default level (RFC 1950 2.2: CMF, FLG with FCHECK)


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 over type and data (PNG 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def up_filtered(rows: np.ndarray, above: np.ndarray | None) -> np.ndarray:
    """Rows [n, w * 3] uint8 -> [n, 1 + w * 3]: each prefixed by its filter type, less the row above it
    (PNG 9.2, filter type 2); `above` is the row before the first (None for the image's first row)."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = UP
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps modulo 256, as the filter does
    out[0, 1:] = rows[0] if above is None else rows[0] - above
    return out


def _band(pixels: np.ndarray, start: int, last: bool) -> tuple[bytes, int]:
    """(deflate data, Adler-32 of the filtered rows) of rows start..start + BAND_ROWS."""
    rows = pixels[start : start + BAND_ROWS].reshape(-1, pixels.shape[1] * pixels.shape[2])
    above = None if start == 0 else pixels[start - 1].reshape(-1)
    data = up_filtered(rows, above)
    deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)  # raw deflate: the header and checksum are the stream's
    body = deflate.compress(data) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return body, zlib.adler32(data)


def _adler32_combine(first: int, second: int, length: int) -> int:
    """Adler-32 of A + B from those of A and B and B's length (zlib's adler32_combine, RFC 1950 8.2)."""
    base = 65521
    rem = length % base
    a1, b1, a2, b2 = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % base
    b = (b1 + b2 + rem * a1 - rem) % base  # B's sums, shifted by A's A-sum once per byte of B
    return (b << 16) | a


def write_png(
    handle: BinaryIO, pixels: np.ndarray, text_chunks: list[tuple[bytes, bytes]] = (), threads: int | None = None
) -> None:
    """Write an 8-bit RGB image [H, W, 3] uint8 (at least 1 x 1) as a PNG, with `text_chunks` ((type, data):
    tEXt, iTXt or zTXt as Pillow's PngInfo makes them) before the image data."""
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8 or not height or not width:
        raise ValueError(f"write_png takes [H, W, 3] uint8 pixels, got {pixels.shape} {pixels.dtype}")
    pixels = np.ascontiguousarray(pixels)
    handle.write(SIGNATURE)
    handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))  # 8-bit RGB, no interlace
    for kind, data in text_chunks:
        handle.write(chunk(kind, data))
    starts = range(0, height, BAND_ROWS)
    checksum, row_bytes = 1, 1 + width * channels
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # zlib lets go of the GIL while it compresses
        bands = pool.map(lambda s: _band(pixels, s, s == starts[-1]), starts)
        for i, (start, (body, adler)) in enumerate(zip(starts, bands, strict=True)):
            rows = min(BAND_ROWS, height - start)
            checksum = _adler32_combine(checksum, adler, rows * row_bytes)
            last = start == starts[-1]
            data = (ZLIB_HEADER if i == 0 else b"") + body + (struct.pack(">I", checksum) if last else b"")
            handle.write(chunk(b"IDAT", data))
    handle.write(chunk(b"IEND", b""))

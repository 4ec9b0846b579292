"""The PNG writer: files Pillow and zlib read back exactly, with the same bytes whatever the thread count."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from farm.png import BAND_ROWS, SIGNATURE, up_filtered, write_png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, its CRC checked."""
    assert data[:8] == SIGNATURE
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        at += 12 + length
    return out


@pytest.mark.parametrize("height", [1, BAND_ROWS - 1, BAND_ROWS, 2 * BAND_ROWS + 3])
def test_a_png_reads_back_as_the_same_pixels_and_text_whatever_the_threads(height):
    rng = np.random.default_rng(height)
    smooth = np.linspace(0, 255, height * 21 * 3).reshape(height, 21, 3)
    pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    meta = PngInfo()
    meta.add_text("tilefarm", '{"spec": 1}')
    meta.add_text("parameters", "a lighthouse \u00e0 l'aube, \u706f\u5854")  # beyond Latin-1: iTXt
    files = []
    for threads in (1, 2, 5):
        out = io.BytesIO()
        write_png(out, pixels, [c[:2] for c in meta.chunks], threads)
        files.append(out.getvalue())
    assert files[0] == files[1] == files[2]  # the bands, not the threads, decide the bytes
    image = Image.open(io.BytesIO(files[0]))
    image.load()
    assert image.mode == "RGB" and image.size == (21, height)
    assert np.array_equal(np.asarray(image), pixels)
    assert image.text == {"tilefarm": '{"spec": 1}', "parameters": "a lighthouse \u00e0 l'aube, \u706f\u5854"}
    # the image data is one zlib stream: zlib checks its Adler-32; every row is Up-filtered
    chunks = _chunks(files[0])
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert raw == up_filtered(pixels.reshape(height, -1), None).tobytes()


def test_the_up_filter_is_the_row_less_the_row_above_modulo_256():
    rows = np.array([[10, 250, 0], [5, 3, 255]], dtype=np.uint8)
    assert up_filtered(rows, None).tolist() == [[2, 10, 250, 0], [2, 251, 9, 255]]
    above = np.array([1, 1, 1], dtype=np.uint8)
    assert up_filtered(rows, above).tolist()[0] == [2, 9, 249, 255]


def test_a_png_of_the_wrong_kind_of_array_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        write_png(io.BytesIO(), np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        write_png(io.BytesIO(), np.zeros((0, 4, 3), dtype=np.uint8))

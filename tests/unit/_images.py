"""Image files in the formats and modes users' folders hold, beside the synthetic set's PNGs and JPEGs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: name → file name; each holds the same picture (grayscale ones its luminance).
ODD_FORMATS = {
    "bmp": "leaf.bmp", "tiff": "leaf.tif", "ppm": "leaf.ppm", "webp": "leaf.webp", "pgm (gray)": "gray.pgm",
    "cmyk jpeg": "cmyk.jpg", "gray jpeg": "gray.jpg", "16-bit gray png": "gray16.png", "16-bit rgb png": "rgb16.png",
}


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) of ``pixels`` ``[H, W, 3]`` ``uint16``."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_odd_formats(picture: Path, folder: Path) -> dict[str, Path]:
    """``picture`` (an 8-bit RGB image) saved in every format of :data:`ODD_FORMATS` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(picture) as opened:
        rgb = opened.convert("RGB")
    gray = rgb.convert("L")
    paths = {name: folder / file for name, file in ODD_FORMATS.items()}
    rgb.save(paths["bmp"])
    rgb.save(paths["tiff"])
    rgb.save(paths["ppm"])
    rgb.save(paths["webp"], lossless=True)
    gray.save(paths["pgm (gray)"])
    rgb.convert("CMYK").save(paths["cmyk jpeg"], quality=95)
    gray.save(paths["gray jpeg"], quality=95)
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(paths["16-bit gray png"])  # mode I;16
    paths["16-bit rgb png"].write_bytes(png_16bit_rgb(np.asarray(rgb).astype(np.uint16) * 257))
    return paths


def write_large_photo(path: Path, width: int = 4000, height: int = 3000) -> Path:
    """A smooth 12 MP JPEG, as a phone saves one: what a folder of photos trained at 32 px holds."""
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    small.resize((width, height), Image.BICUBIC).save(path, quality=90)
    return path

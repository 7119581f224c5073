"""Decoding an image folder into ``uint8`` tensors on a device: JPEGs on the GPU, in batches.

A GPU trains small backbones on thousands of 224 px images per second; a CPU decoder
feeds far fewer. On CUDA, :func:`decode_on_device` hands the JPEG files' bytes to
nvJPEG in batches (``torchvision.io.decode_jpeg(list, device="cuda")``) and resizes them
there (bilinear, antialiased, like PIL's resize); other formats (PNG, ...) are decoded on
the CPU and moved. On the CPU the same function decodes with libjpeg: the fallback, and
what the tests compare the GPU path with.

:class:`EncodedImages` keeps the files' bytes in host memory (a JPEG is a tenth of its
decoded size or less) and decodes any subset on demand: what a set too large for device
memory streams from, batch by batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

#: A JPEG file starts with these bytes (SOI marker, then another marker).
JPEG_MAGIC = b"\xff\xd8\xff"
#: Images decoded per nvJPEG call when decoding a whole set (bounds the device memory it takes).
DECODE_CHUNK = 256


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """torchvision 0.29 warns on every decode that TorchCodec will take its decoders over; once is in the README."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def is_jpeg(data: bytes | torch.Tensor) -> bool:
    """True for JPEG bytes (by their first bytes, whatever the file's name says)."""
    head = bytes(data[:3].tolist()) if isinstance(data, torch.Tensor) else bytes(data[:3])
    return head == JPEG_MAGIC


def read_encoded(paths: Sequence[Path]) -> list[torch.Tensor]:
    """Each file's bytes as a 1-D ``uint8`` CPU tensor."""
    from torchvision.io import read_file

    with _torchvision_io():
        return [read_file(str(path)) for path in paths]


def decode_on_device(encoded: Sequence[torch.Tensor], image_size: int, device: torch.device) -> torch.Tensor:
    """Decode and resize ``encoded`` images: ``uint8`` ``[N, 3, S, S]`` on ``device``, in input order."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    out = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8, device=device)
    jpeg_index: list[int] = []
    other_index: list[int] = []
    for i, data in enumerate(encoded):
        (jpeg_index if is_jpeg(data) else other_index).append(i)
    with _torchvision_io():
        for start in range(0, len(jpeg_index), DECODE_CHUNK):
            chunk = jpeg_index[start:start + DECODE_CHUNK]
            decoded = decode_jpeg([encoded[i] for i in chunk], mode=ImageReadMode.RGB, device=device)
            _resize_into(out, chunk, decoded, image_size)
        for i in other_index:  # PNG and the rest: the CPU decodes, the device resizes
            decoded = decode_image(encoded[i], mode=ImageReadMode.RGB).to(device)
            _resize_into(out, [i], [decoded], image_size)
    return out


def _resize_into(out: torch.Tensor, index: list[int], images: Sequence[torch.Tensor], image_size: int) -> None:
    """Resize ``images`` (``[3, H, W]`` each) to ``image_size`` and write them at ``index`` of ``out``.

    Images of one shape are resized in one call (a photo folder usually has a few shapes).
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    for shape, positions in by_shape.items():
        batch = torch.stack([images[p] for p in positions])
        if shape[1:] != (image_size, image_size):
            batch = F.interpolate(batch.float(), size=(image_size, image_size), mode="bilinear",
                                  align_corners=False, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        out[torch.as_tensor([index[p] for p in positions], device=out.device)] = batch


class EncodedImages:
    """An image set kept encoded in host memory, decoded on ``device`` a subset at a time."""

    def __init__(self, encoded: list[torch.Tensor], image_size: int, device: torch.device) -> None:
        self.encoded = encoded
        self.image_size = image_size
        self.device = device

    @classmethod
    def read(cls, paths: Sequence[Path], image_size: int, device: torch.device) -> EncodedImages:
        """The files at ``paths``, read (not decoded)."""
        return cls(read_encoded(paths), image_size, device)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def nbytes(self) -> int:
        """Host memory the encoded files take."""
        return sum(data.numel() for data in self.encoded)

    def subset(self, indices: Sequence[int]) -> EncodedImages:
        """The images at ``indices``, still encoded (a split's share of the set)."""
        return EncodedImages([self.encoded[i] for i in indices], self.image_size, self.device)

    def decode(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``uint8`` ``[len(indices), 3, S, S]`` on the device, in the order of ``indices``."""
        positions = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        return decode_on_device([self.encoded[i] for i in positions], self.image_size, self.device)

    def decode_all(self) -> torch.Tensor:
        """Every image, decoded once: what a set that fits in device memory keeps."""
        return decode_on_device(self.encoded, self.image_size, self.device)

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
#: Images decoded per nvJPEG call when decoding a whole set, and the encoded bytes one call takes at most
#: (decoded, a JPEG is about ten times larger): they bound the device memory a decode takes.
DECODE_CHUNK = 256
DECODE_CHUNK_BYTES = 64 << 20
#: The largest downscale factor of one resize, and the step taken towards it from a larger one.
MAX_RESIZE_FACTOR = 64
RESIZE_STEP = 16
#: Input pixels resized per call: the float copy a resize makes stays under 1 GiB (3 channels of 4 bytes).
RESIZE_PIXELS = 1 << 26


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """torchvision 0.29 warns on every decode that TorchCodec will take its decoders over; docs/training.md says so once."""
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
    out = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8, device=device)
    jpeg_index: list[int] = []
    other_index: list[int] = []
    for i, data in enumerate(encoded):
        (jpeg_index if is_jpeg(data) else other_index).append(i)
    with _torchvision_io():
        for chunk in _chunks(jpeg_index, encoded):
            _resize_into(out, chunk, _decode_jpegs([encoded[i] for i in chunk], device), image_size)
        for i in other_index:  # PNG and the rest: the CPU decodes, the device resizes
            _resize_into(out, [i], [decode_on_cpu(encoded[i]).to(device)], image_size)
    return out


def _chunks(index: list[int], encoded: Sequence[torch.Tensor]) -> Iterator[list[int]]:
    """``index`` in runs of at most :data:`DECODE_CHUNK` files and :data:`DECODE_CHUNK_BYTES` encoded bytes."""
    chunk: list[int] = []
    size = 0
    for i in index:
        if chunk and (len(chunk) == DECODE_CHUNK or size + encoded[i].numel() > DECODE_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += encoded[i].numel()
    if chunk:
        yield chunk


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEGs decoded on ``device`` in one call; if the device's decoder refuses one (nvJPEG has no CMYK),
    one by one, and those it refuses on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":  # torchvision's decoder writes on its own stream (pytorch/vision#9606): start idle
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        if device.type == "cpu":
            return [decode_on_cpu(one) for one in data]
        # a call that failed part-way may leave nvJPEG's stream still writing the images it had started into
        # buffers it has already given back to the allocator; the retries below would be handed those buffers
        torch.cuda.synchronize(device)
    decoded = []
    for one in data:
        try:
            decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(decode_on_cpu(one).to(device))
    return decoded


def decode_on_cpu(data: torch.Tensor) -> torch.Tensor:
    """One image's bytes decoded on the CPU to ``uint8`` ``[3, H, W]``: torchvision's decoders for JPEG, PNG, WebP
    and GIF, Pillow for the rest (BMP, TIFF, PPM/PGM, CMYK JPEGs libjpeg refuses); 16-bit PNGs keep their
    high byte, as Pillow does."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        decoded = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return _decode_with_pillow(data)
    if decoded.dtype != torch.uint8:
        decoded = (decoded.to(torch.int32) >> 8).to(torch.uint8)
    return decoded


def _decode_with_pillow(data: torch.Tensor) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    from plantml.training.data import to_rgb

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        rgb = np.asarray(to_rgb(image))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _resize_into(out: torch.Tensor, index: list[int], images: Sequence[torch.Tensor], image_size: int) -> None:
    """Resize ``images`` (``[3, H, W]`` each) to ``image_size`` and write them at ``index`` of ``out``.

    Images of one shape are resized together (a photo folder usually has a few shapes), at
    most :data:`RESIZE_PIXELS` input pixels per call, which bounds the float copy it makes.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    for shape, positions in by_shape.items():
        step = max(1, RESIZE_PIXELS // (shape[1] * shape[2]))
        for start in range(0, len(positions), step):
            group = positions[start:start + step]
            batch = torch.stack([images[p] for p in group])
            if shape[1:] != (image_size, image_size):
                batch = _shrink(batch.float(), image_size).round_().clamp_(0, 255).to(torch.uint8)
            out[torch.as_tensor([index[p] for p in group], device=out.device)] = batch


def _shrink(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """Antialiased bilinear resize to ``image_size``; from a photo many times larger (12 MP to 32 px), in steps
    of at most :data:`MAX_RESIZE_FACTOR` (CUDA's antialiased kernel refuses factors past about 94)."""
    height, width = batch.shape[-2:]
    while max(height, width) > image_size * MAX_RESIZE_FACTOR:
        height, width = max(image_size, -(-height // RESIZE_STEP)), max(image_size, -(-width // RESIZE_STEP))
        batch = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(batch, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)


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

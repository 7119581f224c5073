"""A data path that keeps the GPU fed: decode once, keep the images on the device, augment there.

At the rates a modern GPU trains small backbones (thousands of 224 px images per
second), per-image PIL decoding and augmentation in DataLoader workers starves it. For
data sets that fit in GPU memory, :class:`DeviceLoader` holds every image once as
``uint8`` on the device and builds each batch there: a seeded shuffle, random flips,
light brightness/contrast jitter, ImageNet normalisation and the memory format the
model wants. Nothing crosses the host boundary inside an epoch. Under torchrun each rank
holds the whole split on its own GPU and iterates its share, as the samplers of
:mod:`plantml.training.distributed` do for the DataLoader path.

Two things keep batch preparation off the training's critical path on CUDA: every batch
is built with whole-batch operations (one gather, one random draw per batch, no per-image
Python), and :class:`DeviceLoader` builds batch n+1 on a side CUDA stream while batch n
trains. The draws come from the loader's own generator in the same order either way, so a
seed gives the same batches with or without the side stream.

A set too large for device memory is streamed: kept encoded in host memory
(:class:`plantml.training.image_decode.EncodedImages`) and decoded batch by batch on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from plantml.training.data import IMAGENET_MEAN, IMAGENET_STD, DataLoaders, ImageFolderScan, Split, drops_lone_last_image, to_rgb
from plantml.training.distributed import Ranks
from plantml.training.image_decode import EncodedImages
from plantml.training.sharding import rank_share

#: Keep the cached images under this share of the device's free memory.
MAX_MEMORY_SHARE = 0.25


def decode_images(samples: Sequence[tuple[Path, int]], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and resize every image once: ``uint8`` ``[N, 3, S, S]`` and ``int64`` labels, on the CPU."""
    images = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(len(samples), dtype=torch.int64)
    for index, (path, label) in enumerate(samples):
        with Image.open(path) as image:
            rgb = to_rgb(image).resize((image_size, image_size), Image.BILINEAR)
        images[index] = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3).permute(2, 0, 1)
        labels[index] = label
    return images, labels


def fits_on_device(num_images: int, image_size: int, device: torch.device) -> bool:
    """True when ``num_images`` uint8 images take under :data:`MAX_MEMORY_SHARE` of the free device memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return num_images * 3 * image_size * image_size < MAX_MEMORY_SHARE * free


class DeviceLoader:
    """Batches built on the device from images decoded once; iterable like a DataLoader.

    ``train=True`` shuffles (seeded, different each epoch) and augments; otherwise the
    order is fixed and images are only normalised. With ``ranks`` of a distributed
    training, each rank iterates its share (training: padded to equal shares).
    """

    def __init__(self, images: torch.Tensor | EncodedImages, labels: torch.Tensor, *, batch_size: int,
                 device: torch.device, train: bool, seed: int = 0, channels_last: bool = False,
                 ranks: Ranks = Ranks(), prefetch: bool = True) -> None:
        # decoded once and resident on the device, or kept encoded and decoded per batch
        self.images = images.to(device) if isinstance(images, torch.Tensor) else images
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.channels_last = channels_last
        self.prefetch = prefetch and device.type == "cuda"
        self.rank, self.world_size = ranks.rank, ranks.world_size
        # augmentation draws differ per rank; the shuffle is one order for every rank, each taking its share
        self.generator = torch.Generator(device=device).manual_seed(seed + ranks.rank)
        self.order_generator = torch.Generator(device=device).manual_seed(seed) if ranks.distributed else self.generator
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.dataset = _Examples(self)  # len(loader.dataset) and loader.dataset[i], as with a DataLoader

    @property
    def streamed(self) -> bool:
        """True when the images are decoded per batch rather than resident on the device."""
        return isinstance(self.images, EncodedImages)

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        """The ``uint8`` images at ``index``, on the device."""
        return self.images.decode(index) if isinstance(self.images, EncodedImages) else self.images[index]

    def __len__(self) -> int:
        share = self._share_size()
        return (share + self.batch_size - 1) // self.batch_size - self._drops_last(share)

    def _drops_last(self, share: int) -> bool:
        """A last training batch of one image is left out, as the DataLoader path does."""
        return self.train and drops_lone_last_image(share, self.batch_size)

    def _share_size(self) -> int:
        count = len(self.labels)
        return -(-count // self.world_size) if self.train else len(range(self.rank, count, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.labels)
        order = (torch.randperm(count, device=self.device, generator=self.order_generator) if self.train
                 else torch.arange(count, device=self.device))
        order = rank_share(order, self.rank, self.world_size, pad=self.train)
        indices = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self._drops_last(len(order)):
            indices.pop()
        if not self.prefetch:
            for index in indices:
                yield self._batch(self.raw(index)), self.labels[index]
            return
        yield from self._prefetched(order, indices)

    def _prefetched(self, order: torch.Tensor, indices: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batch n+1 built on a side stream while batch n trains on the current one."""
        if not indices:  # an empty share (a split smaller than the number of ranks)
            return
        side = torch.cuda.Stream(device=self.device)
        training = torch.cuda.current_stream(self.device)
        side.wait_stream(training)  # the order was drawn on the training stream
        order.record_stream(side)  # read there: not reused before it is, even if the loop is left early

        def build(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.cuda.stream(side):
                return self._batch(self.raw(index)), self.labels[index]

        ready = build(indices[0])
        for following in [*indices[1:], None]:
            training.wait_stream(side)
            images, labels = ready  # type: ignore[misc]
            images.record_stream(training)  # the allocator must not reuse them while training reads them
            labels.record_stream(training)
            ready = build(following) if following is not None else None
            yield images, labels

    def _batch(self, raw: torch.Tensor) -> torch.Tensor:
        """Augment (training) and normalise ``uint8`` images: flips and the layout change on
        ``uint8`` (a quarter of the memory traffic of floats), the float steps in place."""
        rand = torch.rand((raw.shape[0], 4), device=self.device, generator=self.generator) if self.train else None
        if rand is not None:
            raw = flip(raw, rand)
        if self.channels_last:
            raw = raw.contiguous(memory_format=torch.channels_last)  # the float ops below keep the layout
        images = raw.float()
        if rand is not None:
            jitter_(images, rand)
        return images.sub_(self.mean).div_(self.std)


def flip(images: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """Horizontal flip where ``rand[:, 0] < 0.5``, vertical where ``rand[:, 1] < 0.5``, per image."""
    n = images.shape[0]
    images = torch.where(rand[:, 0].view(n, 1, 1, 1) < 0.5, images.flip(3), images)
    return torch.where(rand[:, 1].view(n, 1, 1, 1) < 0.5, images.flip(2), images)


def jitter_(images: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """±10 % brightness (``rand[:, 2]``) and contrast (``rand[:, 3]``) per image, in place, within 0-255."""
    n = images.shape[0]
    brightness = (0.9 + 0.2 * rand[:, 2]).view(n, 1, 1, 1)
    contrast = (0.9 + 0.2 * rand[:, 3]).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return images.mul_(brightness).sub_(mean).mul_(contrast).add_(mean).clamp_(0, 255)


class _Examples:
    """``loader.dataset[i]`` -> ``(normalised CPU image, label)``, as an ImageFolder-style data set gives."""

    def __init__(self, loader: DeviceLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raw = self.loader.raw(torch.tensor([index], device=self.loader.device))
        image = (raw.float() - self.loader.mean) / self.loader.std
        return image[0].contiguous().cpu(), int(self.loader.labels[index])


def build_device_loaders(scan: ImageFolderScan, split: Split, *, image_size: int, batch_size: int,
                         device: torch.device, seed: int, channels_last: bool, ranks: Ranks = Ranks(),
                         streamed: bool = False) -> DataLoaders:
    """Train/val/test :class:`DeviceLoader` over ``split``, as a :class:`plantml.training.data.DataLoaders`.

    On CUDA the files are decoded on the GPU (:mod:`plantml.training.image_decode`): once
    for the whole set, or batch by batch when ``streamed``. Elsewhere PIL decodes them once
    (:func:`decode_images`, the CPU fallback).
    """
    if streamed and device.type != "cuda":
        raise ValueError("streaming the images needs a CUDA device")
    labels = torch.as_tensor([label for _, label in scan.samples], dtype=torch.int64)
    if device.type == "cuda":
        source: EncodedImages | torch.Tensor = EncodedImages.read([path for path, _ in scan.samples], image_size, device)
    else:
        source, _ = decode_images(scan.samples, image_size)

    def loader(indices, train: bool) -> DeviceLoader:
        chosen = list(indices)
        if isinstance(source, EncodedImages):  # each split decoded on its own: no second copy of the set on the GPU
            part = source.subset(chosen)
            images: EncodedImages | torch.Tensor = part if streamed else part.decode_all()
        else:
            images = source[torch.as_tensor(chosen, dtype=torch.int64)]
        return DeviceLoader(images, labels[chosen], batch_size=batch_size, device=device, train=train,
                            seed=seed, channels_last=channels_last, ranks=ranks)

    return DataLoaders(train=loader(split.train, True), val=loader(split.val, False), test=loader(split.test, False),
                       split=split, classes=scan.classes,
                       extra={"data_on_device": True, "decode": "gpu" if device.type == "cuda" else "cpu",
                              "streamed": streamed})
